"""The ``slurm`` launcher: the runs of a sweep or comparison as one SLURM array job, through submitit.

Each array task is one run directory, executed by :class:`SlurmTask` — the very run function the local
workers call (run-or-resume), wrapped in :func:`marginlab.lab.workers.attempt` so that its outcome comes
back as the task's result. The task is a ``submitit.helpers.Checkpointable``: on the signal SLURM sends
before a time limit (or a preemption), submitit calls :meth:`SlurmTask.checkpoint`, which hands back the
task itself, and requeues the job; a run checkpoints itself after every epoch, so the requeued task
resumes from the run's own checkpoint exactly as ``marginlab run --resume`` does. A task killed outright
(``scontrol requeue``, node loss) starts over the same way when SLURM requeues it.

The submitting command records every job id in ``launch.json`` (:class:`~marginlab.lab.launchers.LaunchState`)
and waits, looking at ``squeue`` every ``poll_s`` seconds: a task that leaves the queue with a result is
finished or failed (the error names its log file); one that leaves without a result (killed, out of
memory, node lost) is failed. A rerun attaches to the recorded jobs still queued or running instead of
submitting their runs again. submitit's folder (sbatch scripts, pickles, logs) is ``<home>/slurm``.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.core import Job as SubmititJob
from submitit.helpers import Checkpointable, DelayedSubmission

from marginlab.base.distributed import slurm_torch_env
from marginlab.base.errors import ConfigError
from marginlab.base.logs import disable_bars, setup_logging
from marginlab.lab.launchers import (
    Event,
    Launcher,
    LaunchState,
    LocalLauncher,
    SlurmConfig,
    check_launcher,
    submission_lock,
)
from marginlab.lab.names import SLURM_FOLDER
from marginlab.lab.workers import Job, Outcome, RunFn, attempt

log = logging.getLogger(__name__)

QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"})
RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"})
_RESULT_GRACE_S = 20.0  # a result pickle may show up on a shared filesystem a little after the job left
_SQUEUE_TIMEOUT_S = 60


def make_launcher(
    name: str, *, jobs: int = 1, slurm: SlurmConfig | None = None, wait: bool = True
) -> Launcher:
    """The launcher called ``name``: ``local`` (``jobs`` processes) or ``slurm`` (``slurm`` settings;
    ``wait=False``: submit and return, see :class:`SlurmLauncher`)."""
    if check_launcher(name) == "local":
        if not wait:
            raise ConfigError("--no-wait is for --launcher slurm (local runs end with the command)")
        return LocalLauncher(jobs)
    if jobs != 1:
        raise ConfigError("--jobs is for the local launcher; with slurm use --array-parallelism")
    return SlurmLauncher(slurm or SlurmConfig(), wait=wait)


class SlurmTask(Checkpointable):
    """One array task: set the process up, run ``run_fn`` on one job, return its :class:`Outcome`."""

    def __init__(self, run_fn: RunFn) -> None:
        self.run_fn = run_fn

    def __call__(self, raw: dict[str, Any], path: str, mode: str) -> Outcome:
        """Run (or resume, or skip) the run at ``path``; several tasks of one job (one per GPU) join a
        torch.distributed group from SLURM's variables, rank 0 writing the run directory."""
        os.environ.update(slurm_torch_env(os.environ))
        disable_bars()  # the output goes to a log file: one line per epoch, no bars
        setup_logging(logging.INFO, tag="/".join(Path(path).parts[-2:]))
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(cpus))
        return attempt(self.run_fn, raw, Path(path), mode)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Preempted or out of time: requeue this same task. The run has checkpointed itself after its
        last epoch, so the requeued task resumes from there (nothing to save here)."""
        return DelayedSubmission(self, *args, **kwargs)


def check_slurm_available() -> None:
    """A one-line :class:`ConfigError` unless SLURM's ``sbatch`` and ``squeue`` are on ``PATH``."""
    missing = [c for c in ("sbatch", "squeue") if shutil.which(c) is None]
    if missing:
        raise ConfigError(f"--launcher slurm needs SLURM's {' and '.join(missing)} on PATH (not found)")


def queue_states() -> dict[str, str] | None:
    """This user's jobs in the queue, ``{"1234_0": "RUNNING", ...}`` (one entry per array task), or
    ``None`` when ``squeue`` cannot be asked."""
    cmd = ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i %T"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_SQUEUE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    pairs = (line.split() for line in proc.stdout.splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2}


def slurm_state_word(state: str | None) -> str | None:
    """marginlab's word for a SLURM job state: ``queued``, ``running`` or ``None`` (not in the queue)."""
    if state in QUEUED_STATES:
        return "queued"
    if state in RUNNING_STATES:
        return "running"
    return None


@dataclass(frozen=True)
class SlurmLauncher:
    """Submits the jobs as one SLURM array (jobs still queued or running are attached to, not
    resubmitted) and waits for them; see the module doc. ``wait=False``: submit, record and return
    without an event (the runs stay pending for the caller; the same command again collects them)."""

    cfg: SlurmConfig
    wait: bool = True

    @property
    def exclusive(self) -> bool:
        """No: the same command again attaches to the jobs still queued or running (see :class:`Launcher`)."""
        return False

    def execute(self, todo: list[Job], run_fn: RunFn, home: Path) -> Generator[Event, None, None]:
        """Submit, record the job ids in ``home``'s ``launch.json``, then yield each run's start and end."""
        if not todo:
            return
        check_slurm_available()
        jobs, state = self._submit_or_attach(todo, run_fn, Path(home))
        if not self.wait:
            return
        try:
            yield from _Waiter(todo, jobs, state, self.cfg.poll_s).events()
        except GeneratorExit:  # the caller stopped waiting (Ctrl-C): the jobs go on by themselves
            log.warning("stopped waiting; the SLURM jobs go on: 'marginlab status %s' shows them", home)
            raise

    def _submit_or_attach(
        self, todo: list[Job], run_fn: RunFn, home: Path
    ) -> tuple[dict[int, SubmititJob[Any]], LaunchState]:
        folder = home / SLURM_FOLDER
        with submission_lock(home):
            state = LaunchState.load(home)
            queue = queue_states()
            if queue is None and any(state.get(p).get("status") in ("queued", "running") for _, p, _ in todo):
                raise ConfigError(
                    f"squeue does not answer: cannot tell whether the jobs recorded in {home} still run, so "
                    "nothing is submitted (never twice); try again, or 'marginlab status' to look"
                )
            queue = queue or {}
            jobs: dict[int, SubmititJob[Any]] = {}
            for i, (_, path, _) in enumerate(todo):
                rec = state.get(path)
                if slurm_state_word(queue.get(str(rec.get("job_id")))):  # alive: never submit it twice
                    tasks = range(int(rec.get("tasks", 1)))
                    jobs[i] = submitit.SlurmJob(folder=folder, job_id=str(rec["job_id"]), tasks=tasks)
                    log.info("run %s is already SLURM job %s; waiting for it", path, rec["job_id"])
            fresh = [i for i in range(len(todo)) if i not in jobs]
            if fresh:
                submitted = self._submit(folder, [todo[i] for i in fresh], run_fn)
                jobs.update(zip(fresh, submitted, strict=True))
                now = time.time()
                for i in fresh:
                    job = jobs[i]
                    state.update(
                        todo[i][1], job_id=job.job_id, tasks=self._tasks, status="queued", error=None,
                        log=str(job.paths.stderr), out=str(job.paths.stdout), submitted=now,
                    )  # fmt: skip
            state.save()
        return jobs, state

    @property
    def _tasks(self) -> int:
        return max(1, self.cfg.gpus_per_task)

    def _submit(self, folder: Path, todo: list[Job], run_fn: RunFn) -> list[SubmititJob[Any]]:
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**sbatch_parameters(self.cfg))
        raws, paths, modes = zip(*todo, strict=True)
        try:
            jobs = executor.map_array(SlurmTask(run_fn), raws, [str(Path(p).resolve()) for p in paths], modes)
        except subprocess.CalledProcessError as e:
            text = (e.stderr or e.output or b"").decode(errors="replace").strip().splitlines()
            raise ConfigError(f"sbatch refused the array job: {text[-1] if text else e}") from None
        except submitit.core.utils.FailedJobError as e:
            raise ConfigError(f"sbatch refused the array job: {str(e).strip().splitlines()[-1]}") from None
        log.info("submitted %d runs as SLURM array job %s", len(jobs), jobs[0].job_id.split("_")[0])
        return list(jobs)


def sbatch_parameters(cfg: SlurmConfig) -> dict[str, Any]:
    """submitit's ``SlurmExecutor`` parameters for one run per array task (see :class:`SlurmConfig`)."""
    tasks = max(1, cfg.gpus_per_task)
    params: dict[str, Any] = {
        "job_name": "marginlab",
        "time": cfg.time,
        "ntasks_per_node": tasks,  # one process per GPU, each seeing every GPU of the run (like torchrun)
        "array_parallelism": cfg.array_parallelism,
    }
    if cfg.gpus_per_task:
        params["gpus_per_node"] = cfg.gpus_per_task
    for key in ("partition", "cpus_per_task", "mem"):
        if getattr(cfg, key) is not None:
            params[key] = getattr(cfg, key)
    if cfg.params:
        params["additional_parameters"] = {k.replace("_", "-"): v for k, v in cfg.params.items()}
    return params


class _Waiter:
    """Watches submitted jobs until each has left the queue; yields their starts and outcomes."""

    def __init__(
        self, todo: list[Job], jobs: dict[int, SubmititJob[Any]], state: LaunchState, poll_s: float
    ) -> None:
        self.todo, self.pending, self.state, self.poll_s = todo, dict(jobs), state, poll_s
        self.started: set[int] = set()
        self.gone: dict[int, float] = {}  # index -> when it was first missed in the queue, no result
        self.warned = False

    def events(self) -> Generator[Event, None, None]:
        """Yield ``(i, None)`` when job ``i`` starts running, ``(i, outcome)`` when it ends."""
        while self.pending:
            queue = queue_states()
            if queue is None and not self.warned:
                log.warning("squeue does not answer; waiting for the runs' result files only")
                self.warned = True
            for i, job in list(self.pending.items()):
                yield from self._look(i, job, queue)
            self.state.save()
            if self.pending:
                time.sleep(self.poll_s)

    def _look(
        self, i: int, job: SubmititJob[Any], queue: dict[str, str] | None
    ) -> Generator[Event, None, None]:
        path = self.todo[i][1]
        word = slurm_state_word(queue.get(job.job_id)) if queue is not None else None
        # The queue first: a job that is queued or running again was requeued, and a result file beside
        # it is that of an earlier attempt (a preempted task can return a spurious error, e.g. when the
        # SIGTERM of its own requeue kills submitit's `scontrol requeue`); only the last attempt counts.
        if word == "queued":
            self.state.update(path, status="queued")
            self.gone.pop(i, None)
            return
        elif word == "running":
            self.state.update(path, status="running")
            self.gone.pop(i, None)
            if i not in self.started:
                self.started.add(i)
                log.info("SLURM job %s started run %s", job.job_id, path)
                yield i, None
            return
        elif job.paths.result_pickle.exists():
            outcome = task_outcome(job)
        elif queue is None or time.monotonic() - self.gone.setdefault(i, time.monotonic()) < _RESULT_GRACE_S:
            return
        else:
            outcome = Outcome(
                f"SLURM job {job.job_id} ended without a result (cancelled, out of memory or time, node "
                f"lost?); see {job.paths.stderr}"
            )
        status = "finished" if outcome.error is None else "failed"
        self.state.update(path, status=status, error=outcome.error)
        del self.pending[i]
        if i not in self.started:
            yield i, None
        log.info("SLURM job %s: run %s %s", job.job_id, path, status)
        yield i, outcome


def task_outcome(job: SubmititJob[Any]) -> Outcome:
    """The :class:`Outcome` a finished task returned (rank 0's); an error names the task's log file."""
    try:
        result = job.results()[0]
    except Exception as e:  # the task died inside submitit (e.g. not requeued after too many timeouts)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Outcome(f"SLURM job {job.job_id} failed: {first}; see {job.paths.stderr}")
    if not isinstance(result, Outcome):
        return Outcome(f"SLURM job {job.job_id} returned {type(result).__name__}, not an outcome")
    if result.error is not None:
        return result._replace(error=f"{result.error} (log: {job.paths.stderr})")
    return result
