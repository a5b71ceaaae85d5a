"""The real single-node SLURM of ``tests/slurm_fixture.py`` works for what the SLURM launcher relies on.

A batch job runs and writes its output; submitit submits a function and returns its result; a job
requeued mid-run (``scontrol requeue``, a hard preemption) starts again and finishes from the state it
saved itself; a job preempted gracefully (SIGTERM + USR2, as submitit's ``job._interrupt()``) has its
``checkpoint`` called and finishes from the checkpointed state. Results are checked against closed forms.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from slurm_fixture import SlurmCluster

pytestmark = pytest.mark.slurm

# The jobs unpickle this module's callables in a fresh interpreter where tests/ is not importable:
# send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# A graceful preemption acts at once; a hard one only after KillWait (5 s, scripts/slurm-local.sh):
# enough steps of 0.1 s that the job is still counting when it is killed.
STEPS = 30
STEPS_HARD = 80


def sum_of_squares(n: int) -> tuple[str, int]:
    """The job's SLURM id and sum(i*i for i < n), computed inside the job."""
    return os.environ["SLURM_JOB_ID"], sum(i * i for i in range(n))


class Counter(submitit.helpers.Checkpointable):
    """Adds i*i for i = 1..n, one step per 0.1 s, logging each event to ``log``.

    With ``resume_from_file`` it saves (i, total) to ``state`` after every step and starts from there,
    as a run directory's checkpoints let ``--resume`` do; otherwise only submitit's ``checkpoint``
    (the pickled object, re-submitted on requeue) carries the state across a preemption.
    """

    def __init__(self, log: Path, state: Path, n: int, resume_from_file: bool) -> None:
        self.log, self.state, self.n, self.resume_from_file = log, state, n, resume_from_file
        self.i, self.total = 0, 0

    def _note(self, line: str) -> None:
        with self.log.open("a") as f:
            f.write(line + "\n")

    def __call__(self) -> int:
        """Count on from the saved state to ``n``; the total."""
        if self.resume_from_file and self.state.exists():
            self.i, self.total = json.loads(self.state.read_text())
        self._note(f"start {self.i} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}")
        while self.i < self.n:
            time.sleep(0.1)
            self.i += 1
            self.total += self.i * self.i
            if self.resume_from_file:
                tmp = self.state.with_suffix(".tmp")
                tmp.write_text(json.dumps([self.i, self.total]))
                tmp.replace(self.state)
            self._note(f"step {self.i}")
        return self.total

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """Note the step reached, then let submitit pickle this object for the requeued job."""
        self._note(f"checkpoint {self.i}")
        return super().checkpoint(*args, **kwargs)


def _executor(cluster: SlurmCluster, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    # Over 10 minutes: submitit counts a USR2 within the first min(80%, time - 10 min) as a preemption;
    # with a shorter limit every signal counts as a time-out (and uses one of its 3 requeues).
    executor.update_parameters(timeout_min=60, slurm_partition=cluster.partition, cpus_per_task=1, mem_gb=1)
    return executor


def _wait_for_line(log: Path, prefix: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and any(line.startswith(prefix) for line in log.read_text().splitlines())):
        assert time.monotonic() < deadline, f"no line {prefix!r} in {log} after {timeout}s"
        time.sleep(0.05)


def test_sbatch_job_runs_and_writes_its_output(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out-%j.txt"
    job_id = slurm_cluster.sbatch("-o", str(out), "--wrap", "echo hi $SLURM_JOB_ID $SLURM_JOB_PARTITION")
    assert slurm_cluster.wait_for_job(job_id) == "COMPLETED"
    assert (tmp_path / f"out-{job_id}.txt").read_text() == f"hi {job_id} {slurm_cluster.partition}\n"
    assert slurm_cluster.job_info(job_id)["NodeList"] == slurm_cluster.node


def test_submitit_returns_the_function_result(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    n = 1000
    job = _executor(slurm_cluster, tmp_path).submit(sum_of_squares, n)
    assert slurm_cluster.wait_for_job(job.job_id) == "COMPLETED"
    assert job.result() == (job.job_id, (n - 1) * n * (2 * n - 1) // 6)


def _count(
    cluster: SlurmCluster, tmp_path: Path, n: int, resume_from_file: bool
) -> tuple[submitit.Job[int], Path]:
    """Submit a Counter to ``n`` and wait until it has made 5 steps; (the job, its log) to preempt."""
    log, state = tmp_path / "log.txt", tmp_path / "state.json"
    job = _executor(cluster, tmp_path).submit(Counter(log, state, n, resume_from_file))
    _wait_for_line(log, "step 5")
    return job, log


def _sum_of_squares_to(n: int) -> int:
    return n * (n + 1) * (2 * n + 1) // 6


def test_scontrol_requeue_restarts_the_job_from_its_own_saved_state(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    job, log = _count(slurm_cluster, tmp_path, STEPS_HARD, resume_from_file=True)
    slurm_cluster.requeue(job.job_id)
    assert slurm_cluster.wait_for_job(job.job_id) == "COMPLETED"
    assert job.result() == _sum_of_squares_to(STEPS_HARD)
    lines = log.read_text().splitlines()
    starts = [line for line in lines if line.startswith("start")]
    # Killed (submitit ignores SIGTERM; SIGKILL after KillWait) without a checkpoint call, then restarted
    # by SLURM from the saved step, which is at least 5 and short of the end.
    assert len(starts) == 2 and starts[0] == "start 0 restart=0", lines
    resumed_at = int(starts[1].split()[1])
    assert starts[1] == f"start {resumed_at} restart=1" and 5 <= resumed_at < STEPS_HARD, lines
    assert not any(line.startswith("checkpoint") for line in lines), lines
    assert slurm_cluster.job_info(job.job_id)["Restarts"] == "1"


def test_usr2_preemption_checkpoints_and_resumes_from_the_checkpoint(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    job, log = _count(slurm_cluster, tmp_path, STEPS, resume_from_file=False)
    slurm_cluster.preempt(job.job_id)
    slurm_cluster.start_now(job.job_id)
    assert slurm_cluster.wait_for_job(job.job_id) == "COMPLETED"
    assert job.result() == _sum_of_squares_to(STEPS)
    lines = log.read_text().splitlines()
    checkpoints = [line for line in lines if line.startswith("checkpoint")]
    assert len(checkpoints) == 1, lines
    at = int(checkpoints[0].split()[1])
    # The requeued job starts where checkpoint() was called, from the pickled object alone.
    assert f"start {at} restart=1" in lines and 5 <= at < STEPS, lines
    assert lines.index(f"step {at + 1}") > lines.index(f"start {at} restart=1"), lines
