"""Stopping a sweep: SIGTERM handled like Ctrl-C, and worker processes that never outlive the sweep.

A sweep can end three ways before its runs do. Ctrl-C (SIGINT) and SIGTERM reach the sweep process, which
kills its workers, records their runs as ``interrupted`` and exits 130 / 143. SIGKILL (or a crash of the
sweep itself) leaves no chance to clean up, so each worker asks the kernel to kill it the moment its parent
dies (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread polls the parent pid). Either way a rerun finds
every unfinished run directory unlocked (a lock dies with its process) and resumes it from its checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_POLL_S = 0.5  # how often the fallback watchdog looks at the parent pid


class SweepStopped(KeyboardInterrupt):
    """The sweep was told to stop by ``signum``; a KeyboardInterrupt, so callers treat it like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signal(exc: KeyboardInterrupt) -> signal.Signals:
    """The signal behind an interruption: the one a :class:`SweepStopped` carries, else SIGINT (Ctrl-C)."""
    return signal.Signals(getattr(exc, "signum", signal.SIGINT))


@contextmanager
def sigterm_stops_sweep() -> Iterator[None]:
    """Within this block SIGTERM raises :class:`SweepStopped` (in the main thread), so the sweep can stop
    its workers and write its tables; a second SIGTERM kills the process at once (the default action)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; the workers still die with the process
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SweepStopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold back SIGINT in this thread while starting a worker (a Ctrl-C then arrives when the block ends).

    A new process inherits the blocked signal, so a Ctrl-C cannot hit a worker while it is still
    importing (and print a traceback) before :func:`ignore_ctrl_c` runs in it."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_ctrl_c() -> None:
    """In a worker: ignore SIGINT (a Ctrl-C in a terminal reaches the whole process group; the sweep
    decides what happens to its workers), then drop the block :func:`ctrl_c_held` started it with."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process die as soon as ``parent_pid``, the sweep that started it, dies.

    Called first thing in a worker. The check after arming closes the race with a parent that died while
    the worker was starting (the worker would then already be an orphan and never get the signal).
    """
    if not _kernel_kills_orphan():
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="sweep-watch").start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _kernel_kills_orphan() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # SIGKILL, not SIGTERM: nothing in a run may delay it, and a run killed mid-epoch is resumable
        # (checkpoints and summaries are written atomically, metrics lines are fsynced one by one).
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)
