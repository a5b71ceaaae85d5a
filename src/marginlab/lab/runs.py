"""Run directories: where every experiment writes its results, and the handle that writes them.

The names of the files and folders of a run directory are spelled in :mod:`marginlab.lab.names` (its
docstring shows the layout), their readers are in :mod:`marginlab.lab.readers`; both are re-exported
here, where they lived before.

A finished run is never overwritten silently (``force`` moves it aside, it is not deleted, and only a
marginlab run directory is ever moved), a lock file stops two processes from writing the same directory
at once, and a run directory is removed only when nothing in it ever finished (:meth:`RunDir.holds_work`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from marginlab.base.errors import RunDirError
from marginlab.base.fsio import TMP_SUFFIX, append_jsonl, atomic_write_json, write_jsonl
from marginlab.lab.names import (
    ADV_IMAGES,
    BRACKET_FIGURE,
    CHECKPOINT,
    CONFIG,
    FIGURES,
    LOCK,
    MARGINS,
    MARGINS_SUMMARY,
    MARGINS_TABLE,
    METRICS,
    PROVENANCE,
    ROBUSTNESS,
    SUBRUNS,
    SUMMARY,
    SVM,
    SWEEP_CSV,
    SWEEP_MANIFEST,
    SWEEP_MD,
    TABLE_CSV,
    TABLE_MD,
    WEIGHTS,
    WORK_FILES,
    margins_file,
    subrun_dir,
)
from marginlab.lab.readers import margins_files, read_config, read_metrics, read_summary

__all__ = [  # the names and readers that lived here before marginlab.lab.names / .readers
    "ADV_IMAGES",
    "BRACKET_FIGURE",
    "CHECKPOINT",
    "CONFIG",
    "FIGURES",
    "LOCK",
    "MARGINS",
    "MARGINS_SUMMARY",
    "MARGINS_TABLE",
    "METRICS",
    "PROVENANCE",
    "ROBUSTNESS",
    "SUBRUNS",
    "SUMMARY",
    "SVM",
    "SWEEP_CSV",
    "SWEEP_MANIFEST",
    "SWEEP_MD",
    "TABLE_CSV",
    "TABLE_MD",
    "WEIGHTS",
    "RunDir",
    "check_out_path",
    "margins_file",
    "margins_files",
    "read_config",
    "read_metrics",
    "read_summary",
    "subrun_dir",
]


def check_out_path(path: str | Path, what: str = "--out") -> Path:
    """Refuse output paths that cannot be a directory: an existing file, ``.``, a name too long."""
    path = Path(path)
    try:
        limit = os.pathconf(_existing_parent(path), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        if len(part.encode()) > limit:
            raise RunDirError(
                f"{what}: the name {part[:40]!r}... is longer than the filesystem allows ({limit})"
            )
    if str(path).strip() in ("", ".", "..") or path.resolve() == Path.cwd().resolve():
        raise RunDirError(f"{what} {str(path)!r} is the current directory; name a new directory for the run")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path} is an existing file, not a directory")
    return path


def _existing_parent(path: Path) -> Path:
    p = path.absolute().parent
    while not os.path.isdir(p):
        p = p.parent
    return p


class RunDir:
    """A handle on one run directory; use :meth:`create` or :meth:`open`, then :meth:`lock`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- creating and opening -------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any], *, force: bool = False) -> RunDir:
        """Make a new run directory holding ``config.json``; refuse to clobber an existing run."""
        rd = cls(check_out_path(path))
        if rd.path.is_dir() and not rd._is_empty():
            # A directory another process is writing (a run being created, a sweep) is "in use", whatever
            # it holds so far: that is the one message that tells the user what is going on.
            rd.check_not_in_use()
            if not force:
                raise RunDirError(rd._occupied_message())
            if not rd.is_run_dir:
                raise RunDirError(
                    f"--force only moves marginlab run directories aside; {rd.path} is not one "
                    f"(no {CONFIG}): choose another --out"
                )
            # Never move a directory that another process is still writing: take its lock first.
            probe = cls(path)
            probe.lock()
            probe.unlock()
            rd._move_aside()
        try:
            rd.path.mkdir(parents=True, exist_ok=True)
            rd.lock()
            atomic_write_json(rd.path / CONFIG, config)
        except RunDirError:
            rd.unlock()
            raise
        except OSError as e:
            rd.unlock()
            raise RunDirError(f"cannot create run directory {rd.path}: {e.strerror or e}") from None
        return rd

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run directory (for resuming, plotting or reporting)."""
        rd = cls(path)
        if not rd.is_run_dir:
            raise RunDirError(f"{rd.path} is not a marginlab run directory (no {CONFIG})")
        return rd

    def _is_empty(self) -> bool:
        """Empty but for a lock file or temporary files (a creation that was killed)."""
        return all(p.name == LOCK or p.name.endswith(TMP_SUFFIX) for p in self.path.iterdir())

    @property
    def is_run_dir(self) -> bool:
        """Whether the directory holds a run (its ``config.json`` exists), finished or not."""
        return (self.path / CONFIG).is_file()

    def _occupied_message(self) -> str:
        if self.finished:
            return (
                f"{self.path} already holds a finished run; choose another --out, "
                "or pass --force to move it aside"
            )
        if self.is_run_dir:
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
    def lock(self, what: str = "run directory", *, shared: bool = False) -> None:
        """Take an exclusive lock on the directory; a second writer gets a clear error naming ``what``
        the directory is (a run directory, a sweep directory) and the pid holding it. ``shared``: a lock
        that other shared holders may hold too, but no exclusive one (SLURM sweeps that attach to one
        another's jobs, against a local sweep)."""
        if self._lock_fd is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot write to {what} {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"{what} {self.path} is in use by another process (pid {holder})") from None
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # a full disk: the lock itself holds, only the pid note is lost
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        self._lock_fd = fd

    def check_not_in_use(self) -> None:
        """Raise the "in use by another process" error if another process holds the directory's lock
        (never creates anything: a directory without a lock file is not in use)."""
        if self._lock_fd is not None or not (self.path / LOCK).is_file():
            return
        probe = type(self)(self.path)
        probe.lock("sweep directory" if (self.path / SWEEP_MANIFEST).is_file() else "run directory")
        probe.unlock()

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (nothing if not held)."""
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
        """Whether the run finished (its ``summary.json`` exists)."""
        return (self.path / SUMMARY).is_file()

    def holds_work(self) -> bool:
        """Whether anything in this directory (sub-runs included) finished: a checkpoint, weights,
        a summary or a robustness result. Only a directory without any may be removed after a failure."""
        return any(next(self.path.rglob(name), None) is not None for name in WORK_FILES)

    @property
    def figures(self) -> Path:
        """The ``figures/`` folder of the run, created if missing."""
        d = self.path / FIGURES
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def checkpoint(self) -> Path:
        """The path of the run's checkpoint (``checkpoint.pt``; it may not exist yet)."""
        return self.path / CHECKPOINT

    @property
    def config(self) -> dict[str, Any]:
        """The run's ``config.json`` (:func:`read_config`)."""
        return read_config(self.path)

    def log_metrics(self, record: Mapping[str, object]) -> None:
        """Append ``record`` as one line of ``metrics.jsonl`` (fsynced; a kill tears at most this line)."""
        append_jsonl(self.path / METRICS, record)

    def metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` (:func:`read_metrics`), as JSON values."""
        return read_metrics(self.path)

    def write_summary(self, summary: Mapping[str, object]) -> None:
        """Write ``summary.json`` atomically (its presence marks the run finished)."""
        atomic_write_json(self.path / SUMMARY, summary)

    def rewind(self, epoch: int) -> list[dict[str, Any]]:
        """Make the directory agree with a checkpoint taken after ``epoch`` (-1: none), for a resume.

        Drops metric records and per-point margin files past ``epoch`` (a killed run may have logged
        them after its last checkpoint), removes temporary files a kill left behind, and returns the
        records kept."""
        self.remove_temp_files()
        records = [r for r in self.metrics() if int(r.get("epoch", -1)) <= epoch]
        write_jsonl(self.path / METRICS, records)
        for e, path in margins_files(self.path).items():
            if e > epoch:
                path.unlink()
        return records

    def remove_temp_files(self, folder: str | None = None) -> None:
        """Delete the ``.*.tmp`` files of interrupted atomic writes (never a finished file), in the
        whole directory or only in its sub-folder ``folder`` (e.g. ``figures``). Call it holding the lock:
        a temporary file is only stale when no process of this directory is writing it."""
        root = self.path if folder is None else self.path / folder
        for path in root.rglob(f".*{TMP_SUFFIX}"):
            if path.is_file():
                path.unlink(missing_ok=True)
