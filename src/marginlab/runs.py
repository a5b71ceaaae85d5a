"""Run directories: where every experiment writes its results.

Layout of a run directory::

    config.json      the full config (with ``kind``), written first
    metrics.jsonl    one JSON record per evaluation step, appended as training goes
    checkpoint.pt    latest checkpoint (experiments that support resume)
    summary.json     written last: its presence marks the run as finished
    figures/         drawn from the files above only (``marginlab plot`` redraws them)

A finished run is never overwritten silently (``force`` moves it aside, it is not deleted), and a lock
file stops two processes from writing the same directory at once.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from marginlab.errors import RunDirError
from marginlab.fsio import append_jsonl, atomic_write_json, read_json, read_jsonl, write_jsonl

CONFIG, METRICS, SUMMARY, CHECKPOINT, LOCK, FIGURES = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "checkpoint.pt",
    ".lock",
    "figures",
)


class RunDir:
    """A handle on one run directory; use :meth:`create` or :meth:`open`, then :meth:`lock`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- creating and opening -------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any], *, force: bool = False) -> RunDir:
        """Make a new run directory holding ``config.json``; refuse to clobber an existing run."""
        rd = cls(path)
        if rd.path.exists() and any(rd.path.iterdir()):
            if not force:
                raise RunDirError(rd._occupied_message())
            # Never move a directory that another process is still writing: take its lock first.
            probe = cls(path)
            probe.lock()
            probe.unlock()
            rd._move_aside()
        try:
            rd.path.mkdir(parents=True, exist_ok=True)
            rd.lock()
            atomic_write_json(rd.path / CONFIG, config)
        except PermissionError:
            rd.unlock()
            raise RunDirError(f"cannot write to run directory {rd.path}: permission denied") from None
        except OSError as e:
            rd.unlock()
            raise RunDirError(f"cannot create run directory {rd.path}: {e.strerror or e}") from None
        return rd

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run directory (for resuming, plotting or reporting)."""
        rd = cls(path)
        if not (rd.path / CONFIG).is_file():
            raise RunDirError(f"{rd.path} is not a marginlab run directory (no {CONFIG})")
        return rd

    def _occupied_message(self) -> str:
        if self.finished:
            return (
                f"{self.path} already holds a finished run; choose another --out, "
                "or pass --force to move it aside"
            )
        if (self.path / CONFIG).is_file():
            return (
                f"{self.path} holds an unfinished run; continue it with "
                f"'marginlab run --resume {self.path}', or pass --force to move it aside"
            )
        return f"{self.path} exists and is not empty; choose another --out"

    def _move_aside(self) -> None:
        # --force never deletes results: the old directory is renamed next to the new one.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.old-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}")
            n += 1
        self.path.rename(target)

    # -- locking --------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take an exclusive lock on the directory; a second writer gets a clear error."""
        if self._lock_fd is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"run directory {self.path} is in use by another process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # -- contents -------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY).is_file()

    @property
    def figures(self) -> Path:
        d = self.path / FIGURES
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def config(self) -> dict[str, Any]:
        return read_config(self.path)

    def log_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS, record)

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with ``records`` (on resume: drop lines past the checkpoint)."""
        write_jsonl(self.path / METRICS, records)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY, summary)


def read_config(path: str | Path) -> dict[str, Any]:
    return _read(Path(path) / CONFIG)


def read_summary(path: str | Path) -> dict[str, Any]:
    return _read(Path(path) / SUMMARY)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(path) / METRICS)


def _read(file: Path) -> Any:
    if not file.is_file():
        raise RunDirError(f"{file.parent} is not a complete run directory: {file.name} is missing")
    try:
        return read_json(file)
    except ValueError:
        raise RunDirError(f"{file} is corrupt (not valid JSON)") from None
