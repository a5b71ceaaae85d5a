"""A real single-node SLURM for the tests: the session fixture ``slurm_cluster`` and helpers to drive jobs.

``scripts/slurm-local.sh start`` brings the cluster up (Debian's slurmctld, slurmd and munge, installed
with apt-get when this is root and they are missing; everything under ``$MARGINLAB_SLURM_DIR``, default
``/tmp/marginlab-slurm``). The fixture exports ``SLURM_CONF`` into ``os.environ`` for the whole session,
so ``sbatch``/``squeue``/``scontrol`` and submitit (jobs inherit the environment) talk to that cluster.
It skips only when SLURM is missing and cannot be installed (not root, no apt-get, apt-get failed);
any other failure to start is a test error. ``tests/conftest.py`` imports the fixture.

The cluster has no accounting database: ``sacct`` fails (submitit then logs "Bypassing sacct error" and
reports the state UNKNOWN, but ``job.result()`` works); :meth:`SlurmCluster.job_state` asks ``scontrol``,
which remembers finished jobs for ``MinJobAge`` = 600 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-local.sh"
DEFAULT_DIR = "/tmp/marginlab-slurm"
# scripts/slurm-local.sh exits with this when SLURM is missing and cannot be installed here.
EXIT_CANNOT_INSTALL = 3
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)


@dataclass(frozen=True)
class SlurmCluster:
    """The running test cluster: its config, its one partition and node, and helpers to drive jobs.

    Job ids are strings as SLURM prints them: ``"12"`` or, for an array task, ``"12_3"``.
    """

    conf: Path
    dir: Path
    partition: str
    node: str
    cpus: int

    def run(self, *args: str, timeout: float = 30.0) -> str:
        """Run a SLURM client command (``sbatch``, ``scontrol``...) on this cluster; its stdout."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (``sbatch ARGS``, e.g. ``"--wrap", "echo hi"``); its job id."""
        return self.run("sbatch", "--parsable", *args).strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``StdOut``...); empty if unknown.

        For an array's own id (``"12"``) this is its first task's line; ask for ``"12_3"`` for a task.
        """
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0 or not done.stdout.strip():
            return {}
        # One line of `Key=Value` pairs; values never contain ` Key=`, so split at those.
        line = done.stdout.strip().splitlines()[0]
        return dict(re.findall(r"([\w/:]+)=(.*?)(?= [\w/:]+=|$)", line))

    def job_state(self, job_id: str) -> str:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``...), ``UNKNOWN`` when SLURM forgot it."""
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_for_state(self, job_id: str, states: set[str] | frozenset[str], timeout: float = 60.0) -> str:
        """Poll until the job is in one of ``states``; that state. ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        state = self.job_state(job_id)
        while state not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {state} after {timeout:.0f}s, not in {sorted(states)}")
            time.sleep(0.2)
            state = self.job_state(job_id)
        return state

    def wait_for_job(self, job_id: str, timeout: float = 60.0) -> str:
        """Wait until the job has ended; its final state (``COMPLETED``, ``FAILED``, ``CANCELLED``...)."""
        return self.wait_for_state(job_id, FINAL_STATES, timeout)

    def start_now(self, job_id: str, timeout: float = 30.0) -> None:
        """Let a requeued job start again about 2 s after it is pending, not after SLURM's hold.

        SLURM holds a requeued job for ``cred_expire`` + 1 s (6 s here, 121 s by default). Starting it
        in the same second as its old credential was revoked fails the job ("Job credential revoked"),
        hence the 2 s pause.
        """
        self.wait_for_state(job_id, {"PENDING", *FINAL_STATES}, timeout)
        time.sleep(2.0)
        if self.job_state(job_id) == "PENDING":
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def requeue(self, job_id: str, *, start_now: bool = True) -> None:
        """``scontrol requeue``: a hard preemption (SIGTERM, SIGKILL after KillWait = 5 s, back to the queue).

        submitit ignores SIGTERM and does not call ``checkpoint`` here: the requeued task restarts from
        what was submitted, so it must find its own saved state (a run directory's checkpoints).
        """
        self.run("scontrol", "requeue", job_id)
        if start_now:
            self.start_now(job_id)

    def preempt(self, job_id: str, signal: str = "USR2") -> None:
        """A graceful preemption as submitit's ``job._interrupt()`` does it: SIGTERM, then ``signal``.

        submitit (1.5) catches USR2 (its ``SUBMITIT_PREEMPT_SIGNAL``), calls the callable's ``checkpoint``,
        and requeues the job itself with ``scontrol requeue``; follow with :meth:`start_now`.
        """
        self.run("scancel", "--signal=TERM", job_id)
        self.run("scancel", f"--signal={signal}", job_id)


def _start(directory: Path) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/slurm-local.sh start DIRECTORY`` (installing SLURM first takes 10-25 s)."""
    return subprocess.run(
        ["bash", str(SCRIPT), "start", str(directory)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node SLURM (partition ``debug``) with ``SLURM_CONF`` exported for the session.

    A cluster already running in the directory is reused. The cluster is left running afterwards
    (``bash scripts/slurm-local.sh stop`` stops it): another pytest session may be using it.
    """
    directory = Path(os.environ.get("MARGINLAB_SLURM_DIR", DEFAULT_DIR))
    started = _start(directory)
    message = (started.stderr.strip().splitlines() or ["(no output)"])[-1]
    if started.returncode == EXIT_CANNOT_INSTALL:
        pytest.skip(f"no SLURM here: {message}")
    if started.returncode != 0:
        pytest.fail(f"scripts/slurm-local.sh start failed ({started.returncode}): {started.stderr.strip()}")
    conf = directory / "slurm.conf"
    node = re.search(r"^NodeName=(\S+) .*CPUs=(\d+)", conf.read_text(), re.MULTILINE)
    assert node is not None, f"no NodeName line in {conf}"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(conf=conf, dir=directory, partition="debug", node=node[1], cpus=int(node[2]))
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
