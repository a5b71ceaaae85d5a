"""The state of every run of a sweep or comparison, launched here or on SLURM (``marginlab status``).

Everything is read from files, plus ``squeue`` when it answers: which runs there are (a sweep's
``sweep.json``; a comparison's ``config.json``: bases × seeds × recipes), what each run directory holds
(``summary.json``: finished; its last ``metrics.jsonl`` record: the epoch reached; its lock held by a
live process: running here), and what the launcher recorded (``launch.json``: SLURM job ids, log files,
failures; ``sweep.json``: a local sweep's failures). A run's state is one of ``pending`` (never
started), ``queued``, ``running``, ``finished``, ``failed`` and ``interrupted`` (started, not finished,
nothing running it now: a rerun resumes it).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marginlab.base.errors import RunDirError
from marginlab.base.fsio import read_json
from marginlab.lab.launchers import LaunchState
from marginlab.lab.names import CONFIG, LOCK, ROBUSTNESS, SUMMARY, SWEEP_MANIFEST, subrun_dir
from marginlab.lab.readers import is_run_dir, read_config, read_metrics
from marginlab.lab.slurm import queue_states, slurm_state_word

STATES = ("pending", "queued", "running", "finished", "failed", "interrupted")


@dataclass(frozen=True)
class RunStatus:
    """One run: its name (path relative to the sweep or comparison), state, last epoch of ``total``
    (``None`` when unknown), SLURM job id and log file (when launched there) and error (one line)."""

    name: str
    state: str
    epoch: int | None = None
    total: int | None = None
    job_id: str | None = None
    log: str | None = None
    error: str | None = None


def run_statuses(home: str | Path, queue: dict[str, str] | None = None) -> list[RunStatus]:
    """Every run of the sweep or comparison ``home``, in order; ``queue``: ``squeue``'s view
    (:func:`marginlab.lab.slurm.queue_states`; asked when not given and SLURM jobs are recorded)."""
    home = Path(home)
    launch = LaunchState.load(home)
    recorded = _recorded_failures(home)
    if queue is None and launch.runs:
        queue = queue_states()
    # a comparison's sub-run is done once its robustness was evaluated too
    needed = (SUMMARY, ROBUSTNESS) if _is_compare(home) else (SUMMARY,)
    return [
        _status(home, path, launch.get(path), queue, recorded.get(launch.key(path)), needed)
        for path in run_paths(home, launch)
    ]


def _is_compare(home: Path) -> bool:
    return is_run_dir(home) and read_config(home).get("kind") == "compare"


def run_paths(home: Path, launch: LaunchState | None = None) -> list[Path]:
    """The run directories of the sweep or comparison ``home``; a one-line :class:`RunDirError` when
    ``home`` is neither."""
    launch = launch or LaunchState.load(home)
    paths: list[Path] = []
    if (home / SWEEP_MANIFEST).is_file() and not is_run_dir(home):
        paths = [home / r["name"] for r in _manifest_runs(home)]
    elif _is_compare(home):
        cfg = read_config(home)
        bases = [str(b.get("name")) for b in cfg.get("bases", [])]
        paths = [
            subrun_dir(home, b, r, s)
            for b in bases
            for s in cfg.get("seeds", [])
            for r in cfg.get("recipes", [])
        ]
    known = {launch.key(p) for p in paths}
    paths += [home / k for k in launch.runs if k not in known]
    if not paths:
        raise RunDirError(
            f"{home} is not a sweep or comparison directory (no {SWEEP_MANIFEST}, no compare {CONFIG})"
        )
    return paths


def _manifest_runs(home: Path) -> list[dict[str, Any]]:
    try:
        return list(read_json(home / SWEEP_MANIFEST)["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        raise RunDirError(f"{home / SWEEP_MANIFEST} is corrupt (not a marginlab sweep manifest)") from None


def _recorded_failures(home: Path) -> dict[str, str]:
    """A local sweep's failed runs (name -> error) from its manifest."""
    if not (home / SWEEP_MANIFEST).is_file() or is_run_dir(home):
        return {}
    return {
        r["name"]: r.get("error") or "failed" for r in _manifest_runs(home) if r.get("status") == "failed"
    }


def _status(
    home: Path,
    path: Path,
    rec: dict[str, Any],
    queue: dict[str, str] | None,
    failure: str | None,
    needed: tuple[str, ...],
) -> RunStatus:
    name = str(path.relative_to(home)) if path.is_relative_to(home) else str(path)
    job_id = rec.get("job_id")
    epoch, total = progress(path)
    alive = slurm_state_word(queue.get(str(job_id))) if queue is not None and job_id else None
    if all((path / name).is_file() for name in needed):
        state, error = "finished", None
    elif alive is not None:
        state, error = alive, None
    elif lock_held(path):
        state, error = "running", None
    elif rec.get("status") == "failed" or failure is not None:
        state, error = "failed", rec.get("error") or failure
    elif (path / CONFIG).is_file():
        state, error = "interrupted", None
    else:
        state, error = "pending", None
    return RunStatus(name, state, epoch, total, job_id, rec.get("log"), error)


def progress(path: Path) -> tuple[int | None, int | None]:
    """``(last epoch logged, epochs in the config)`` of a run directory (``None`` when unknown)."""
    if not (path / CONFIG).is_file():
        return None, None
    try:
        records = read_metrics(path)
        total = read_config(path).get("train", {}).get("epochs")
    except (OSError, ValueError, RunDirError):
        return None, None
    epochs = [int(r["epoch"]) for r in records if isinstance(r.get("epoch"), int)]
    return (max(epochs) if epochs else None), (int(total) if isinstance(total, int) else None)


def lock_held(path: Path) -> bool:
    """Whether a live process holds the run directory's lock (a run executing on this machine)."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
