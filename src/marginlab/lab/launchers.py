"""Where the runs of a sweep or comparison execute: here (``local``) or as one SLURM array job (``slurm``).

A launcher takes the jobs ``(raw config, run directory, mode)`` and a run function — the same run-or-resume
function either way (:func:`marginlab.lab.runner.run_or_resume`, wrapped by the sweep or the comparison)
— and yields ``(index, None)`` when a run starts and ``(index, outcome)`` when it ends, like
:func:`marginlab.lab.workers.execute`, so the sweep and the comparison record runs one way whatever
executes them. ``local`` is :func:`~marginlab.lab.workers.execute` (``jobs`` worker processes);
``slurm`` (:mod:`marginlab.lab.slurm`) submits the runs as one array job through submitit and waits for it.

The SLURM launcher keeps a small state file in the sweep or comparison directory (``launch.json``,
:class:`LaunchState`): per run its job id, log path, last known state and error, written atomically after
every change. ``marginlab status`` reads it; a rerun reads it to attach to jobs still queued or running
instead of submitting their runs twice.
"""

from __future__ import annotations

import fcntl
import re
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from marginlab.base.config import check_count, require
from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import atomic_write_json, read_json
from marginlab.lab.names import LAUNCH_LOCK, LAUNCH_STATE
from marginlab.lab.workers import Job, Outcome, RunFn, execute

LAUNCHERS = ("local", "slurm")
Event = tuple[int, Outcome | None]  # (index into the jobs, None when it starts / its outcome when it ends)
_MEM = re.compile(r"[1-9][0-9]*[KMGT]?")
_PARAM = re.compile(r"[a-z][a-z0-9_-]*")
# sbatch options the launcher sets itself: given as extra params they would contradict it
_OWN_PARAMS = {"array", "output", "error", "open-mode", "signal", "ntasks-per-node", "job-name", "wrap"}


@dataclass(frozen=True)
class SlurmConfig:
    """The ``[slurm]`` table: what each array task (one run) asks of SLURM.

    ``time`` in minutes; ``gpus_per_task``: GPUs of one run (more than one: that many processes, one per
    GPU, joined by ``torch.distributed``); ``cpus_per_task``: CPUs of each of those processes; ``mem``:
    memory per node such as ``"8G"``; ``array_parallelism``: runs at once at most; ``params``: any other
    sbatch option, ``{"qos" = "high", "account" = "lab"}``; ``poll_s``: seconds between looks at the queue.
    """

    partition: str | None = None
    time: int = 60
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    array_parallelism: int = 256
    params: dict[str, Any] = field(default_factory=dict)
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        check_count("slurm.time (minutes)", self.time)
        check_count("slurm.gpus_per_task", self.gpus_per_task, minimum=0)
        if self.cpus_per_task is not None:
            check_count("slurm.cpus_per_task", self.cpus_per_task)
        check_count("slurm.array_parallelism", self.array_parallelism)
        require(
            self.partition is None or bool(re.fullmatch(r"[A-Za-z0-9_.,-]+", self.partition)),
            f"slurm.partition {self.partition!r} is not a partition name",
        )
        require(
            self.mem is None or bool(_MEM.fullmatch(str(self.mem))),
            f"slurm.mem must be a size such as 8G or 500M, got {self.mem!r}",
        )
        require(
            isinstance(self.poll_s, int | float) and 0 < self.poll_s <= 600,
            f"slurm.poll_s must lie in (0, 600] seconds, got {self.poll_s!r}",
        )
        for key in self.params:
            require(
                bool(_PARAM.fullmatch(key)), f"slurm param {key!r} is not an sbatch option name such as qos"
            )
            require(
                key.replace("_", "-") not in _OWN_PARAMS,
                f"slurm param {key!r} is set by marginlab itself; leave it out",
            )


def check_launcher(name: object) -> str:
    """``name`` if it is a launcher (``local`` or ``slurm``), else a one-line :class:`ConfigError`."""
    if name not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {name!r}; choose one of: {', '.join(LAUNCHERS)}")
    return str(name)


class Launcher(Protocol):
    """Executes the jobs of a sweep or comparison whose files live in ``home``; see the module doc."""

    @property
    def exclusive(self) -> bool:
        """Whether one sweep alone may use ``home`` at a time: so for runs executed by this process's
        workers (a second sweep's workers would find every run in use); not for SLURM, where a second
        submitter attaches to the jobs ``launch.json`` records (the sweep then shares ``home``'s lock)."""
        ...

    def execute(self, todo: list[Job], run_fn: RunFn, home: Path) -> Generator[Event, None, None]:
        """Run every job; yield ``(index, None)`` at its start and ``(index, outcome)`` at its end."""
        ...


@dataclass(frozen=True)
class LocalLauncher:
    """Runs on this machine: ``jobs`` at a time, each in its own worker process (``1``: in this process)."""

    jobs: int = 1

    @property
    def exclusive(self) -> bool:
        """Yes: the runs execute here; a second sweep on ``home`` is refused (see :class:`Launcher`)."""
        return True

    def execute(self, todo: list[Job], run_fn: RunFn, home: Path) -> Generator[Event, None, None]:
        """:func:`marginlab.lab.workers.execute` (``home`` is not needed: nothing is recorded)."""
        yield from execute(todo, run_fn, self.jobs)


@dataclass
class LaunchState:
    """``launch.json`` of a sweep or comparison directory ``home``: per run (its path relative to
    ``home``) the SLURM job id, log files, state (queued, running, finished, failed, interrupted) and
    error. Every :meth:`save` replaces the file atomically."""

    home: Path
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    launcher: str = "slurm"

    @classmethod
    def load(cls, home: Path) -> LaunchState:
        """The state recorded in ``home`` (empty when there is none)."""
        path = home / LAUNCH_STATE
        if not path.is_file():
            return cls(home)
        try:
            data = read_json(path)
        except (OSError, ValueError) as e:
            raise RunDirError(
                f"{path} is unreadable ({e}); move it away to start the bookkeeping over"
            ) from None
        return cls(home, dict(data.get("runs", {})), str(data.get("launcher", "slurm")))

    def key(self, path: Path) -> str:
        """How a run directory is named in the file: relative to ``home`` when inside it."""
        try:
            return str(Path(path).resolve().relative_to(self.home.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    def get(self, path: Path) -> dict[str, Any]:
        """The record of the run at ``path`` (empty if it has none)."""
        return self.runs.get(self.key(path), {})

    def update(self, path: Path, **fields: Any) -> None:
        """Change fields of the run's record (in memory; :meth:`save` writes it)."""
        self.runs.setdefault(self.key(path), {}).update(fields)

    def save(self) -> None:
        """Write ``launch.json`` atomically (a full disk: one-line :class:`RunDirError`, old file kept)."""
        try:
            atomic_write_json(self.home / LAUNCH_STATE, {"launcher": self.launcher, "runs": self.runs})
        except OSError as e:
            raise RunDirError(f"cannot write {self.home / LAUNCH_STATE}: {e.strerror or e}") from None


@contextmanager
def submission_lock(home: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``home`` while deciding what to submit and recording it, so that two
    commands started at once cannot both submit the same run (the second waits, then sees the first's
    job ids)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LAUNCH_LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
