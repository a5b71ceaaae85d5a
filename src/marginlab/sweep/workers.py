"""Running the runs of a sweep: one at a time in this process, or several in spawned worker processes."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from marginlab.errors import MarginlabError
from marginlab.runs import CHECKPOINT, SUMMARY, RunDir

# A run function gets (raw config, run directory, mode) and runs that one experiment to completion.
RunFn = Callable[[dict[str, Any], Path, str], object]
Job = tuple[dict[str, Any], Path, str]  # (raw config, run directory, mode)
Outcome = tuple[str | None, str | None, float | None]  # (one-line error, traceback, seconds)


def default_run(raw: dict[str, Any], path: Path, mode: str) -> None:
    """Run one grid point with the experiment runner (``mode``: new, resume or restart)."""
    from marginlab.runner import resume_experiment, run_experiment

    if mode == "resume":
        resume_experiment(path)
        return
    if mode == "restart":
        # Refuse to move aside a directory that another process is writing (e.g. a second sweep).
        probe = RunDir(path)
        probe.lock()
        probe.unlock()
    run_experiment(raw, path, force=mode == "restart")


def run_mode(path: Path) -> str:
    """What a (re)started sweep does with a run directory: skip, new, resume or restart."""
    if not path.is_dir() or not any(path.iterdir()):
        return "new"
    if (path / SUMMARY).is_file():
        return "skip"
    return "resume" if (path / CHECKPOINT).is_file() else "restart"


def attempt(run_fn: RunFn, raw: dict[str, Any], path: Path, mode: str) -> Outcome:
    """Run one point, returning (error, traceback, seconds); runs inside a worker process when jobs > 1."""
    start = time.perf_counter()
    try:
        run_fn(raw, path, mode)
        error = tb = None
    except MarginlabError as e:
        error, tb = str(e), None
    except Exception as e:  # a bug in one run must not stop the others; keep its traceback
        error, tb = f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc()
    return error, tb, time.perf_counter() - start


def init_worker(threads: int) -> None:
    # Workers share the CPU: without this every one of them would start a thread per core.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def execute(todo: list[Job], run_fn: RunFn, jobs: int) -> Iterator[tuple[int, Outcome]]:
    """Run ``(config, path, mode)`` jobs, ``jobs`` at a time; yield (index, outcome) as each one ends."""
    if jobs == 1 or len(todo) <= 1:
        for i, job in enumerate(todo):
            yield i, attempt(run_fn, *job)
        return
    workers = min(jobs, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and locks
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(attempt, run_fn, *job): i for i, job in enumerate(todo)}
        for fut in as_completed(futures):
            try:
                outcome = fut.result()
            except Exception as e:  # BrokenProcessPool (a worker was killed: out of memory, a signal)
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                outcome = (f"the run's worker process failed ({reason})", None, None)
            yield futures[fut], outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: start nothing new
