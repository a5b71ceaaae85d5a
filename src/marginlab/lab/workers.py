"""Running the runs of a sweep: one at a time in this process, or each in its own spawned worker process.

One fresh process per run (not a pool): a worker that dies (out of memory, a signal) fails its own run
only, its exit status says why, and the sweep knows exactly which runs are running when it is stopped.
Workers die with the sweep and leave Ctrl-C to it (see :mod:`marginlab.lab.stopping`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, NamedTuple

from marginlab.base.errors import MarginlabError
from marginlab.base.logs import disable_bars, setup_logging
from marginlab.lab.stopping import ctrl_c_held, die_with_parent, ignore_ctrl_c

# A run function gets (raw config, run directory, mode) and runs that one experiment to completion.
RunFn = Callable[[dict[str, Any], Path, str], object]
Job = tuple[dict[str, Any], Path, str]  # (raw config, run directory, mode)
# Someone stopping a worker on purpose, not the run failing: its run is resumed by the next sweep.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_EXIT_GRACE_S = 5.0  # a worker that has sent its outcome only has to exit; one that does not is killed


class Outcome(NamedTuple):
    """How one run ended: ``error`` (one line) is None when it finished; ``interrupted`` when it was
    stopped from outside rather than failing."""

    error: str | None
    traceback: str | None = None
    seconds: float | None = None
    interrupted: bool = False


def attempt(run_fn: RunFn, raw: dict[str, Any], path: Path, mode: str) -> Outcome:
    """Run one point and say how it ended; a KeyboardInterrupt (Ctrl-C, SIGTERM) propagates."""
    start = time.perf_counter()
    try:
        run_fn(raw, path, mode)
        error = tb = None
    except MarginlabError as e:
        error, tb = str(e), None
    except Exception as e:  # a bug in one run must not stop the others; keep its traceback
        error, tb = f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc()
    return Outcome(error, tb, time.perf_counter() - start)


def execute(todo: list[Job], run_fn: RunFn, jobs: int) -> Generator[tuple[int, Outcome | None], None, None]:
    """Run ``(config, path, mode)`` jobs, ``jobs`` at a time: yield ``(index, None)`` when a job starts and
    ``(index, outcome)`` when it ends. Closing the iterator early (an exception in the caller, or a
    KeyboardInterrupt while waiting) kills the workers still running."""
    if jobs == 1 or len(todo) <= 1:
        for i, job in enumerate(todo):
            yield i, None
            yield i, attempt(run_fn, *job)
        return
    workers = min(jobs, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    running: dict[int, _Worker] = {}
    _start_quiet_resource_tracker()
    try:
        for i, job in enumerate(todo):
            while len(running) >= workers:
                yield from _reap(running)
            running[i] = _Worker.start(run_fn, job, threads)
            yield i, None
        while running:
            yield from _reap(running)
    finally:
        for worker in running.values():
            worker.kill()


def _reap(running: dict[int, _Worker]) -> Iterator[tuple[int, Outcome]]:
    """Wait until at least one worker has ended; yield the outcome of each that has."""
    ready = wait([w.conn for w in running.values()])  # readable: the outcome came, or the worker died
    for i in [i for i, w in running.items() if w.conn in ready]:
        outcome = running[i].collect()
        del running[i]
        yield i, outcome


@dataclass
class _Worker:
    """One spawned process running one job; ``conn`` receives its :class:`Outcome`."""

    process: SpawnProcess
    conn: Connection

    @classmethod
    def start(cls, run_fn: RunFn, job: Job, threads: int) -> _Worker:
        # spawn, not fork: fork would copy torch's thread pools and locks into the child.
        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        level = _log_level()
        process = ctx.Process(
            target=_worker_main,
            # run_fn goes pickled and is unpickled by the worker only after it is armed to die with this
            # process: unpickling imports run_fn's module (for a sweep, the whole package with torch:
            # seconds), and a worker still importing when the sweep is stopped would outlive it.
            args=(writer, os.getpid(), threads, pickle.dumps(run_fn), job, level),
            name="marginlab-sweep",
        )
        with ctrl_c_held():
            process.start()
        writer.close()  # the worker holds the only write end: its death reads as end-of-file here
        return cls(process, reader)

    def collect(self) -> Outcome:
        """The outcome the worker sent, or one made from its exit status if it died without sending."""
        try:
            outcome: Outcome | None = self.conn.recv()
        except (EOFError, OSError):
            outcome = None
        self.process.join(_EXIT_GRACE_S)
        self.kill()
        return outcome or _death_outcome(self.process.exitcode)

    def kill(self) -> None:
        """Kill the worker (its run stays resumable: everything a run writes is atomic) and reap it."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _start_quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the workers share it) without its leak warnings.

    A worker killed on purpose dies holding tqdm's multiprocessing lock; the tracker then removes that
    semaphore as it should, but warns about each one ("leaked semaphore objects") on the terminal, after
    the sweep's own one-line message, or even after the shell prompt when the sweep itself was killed.
    """
    from multiprocessing import resource_tracker

    previous = os.environ.get("PYTHONWARNINGS")
    # The tracker is a new interpreter: it reads its warning filters from the environment it starts with.
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [previous, "ignore:resource_tracker:UserWarning"]))
    try:
        resource_tracker.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = previous


def _death_outcome(exitcode: int | None) -> Outcome:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode)
        if sig in _STOP_SIGNALS:
            return Outcome(f"the run's worker process was stopped by {sig.name}", interrupted=True)
        return Outcome(f"the run's worker process failed (killed by {sig.name})")
    return Outcome(f"the run's worker process failed (exit status {exitcode})")


def _log_level() -> int | None:
    """marginlab's log level in this process when logging is set up (the CLI), else ``None``."""
    return logging.getLogger("marginlab").getEffectiveLevel() if logging.getLogger().handlers else None


def _setup_worker_logging(level: int | None, path: Path) -> None:
    """Log like the parent, each line tagged with the run (``base/recipe-seed0``): several workers share
    the parent's stderr, where progress bars would overwrite each other, so the bars are off."""
    disable_bars()
    if level is not None:
        setup_logging(level, tag="/".join(path.parts[-2:]))


def _worker_main(
    conn: Connection, parent_pid: int, threads: int, pickled_run_fn: bytes, job: Job, level: int | None
) -> None:
    """The body of a worker process: set the process up, run the job, send back its outcome.

    ``pickled_run_fn`` is the :data:`RunFn`, pickled: it is loaded (its module imported) only once this
    process dies with its parent."""
    die_with_parent(parent_pid)
    ignore_ctrl_c()
    run_fn: RunFn = pickle.loads(pickled_run_fn)
    _setup_worker_logging(level, Path(job[1]))
    # Workers share the CPU: without this every one of them would start a thread per core.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    conn.send(attempt(run_fn, *job))
    conn.close()
