"""A sweep stopped by a signal takes its workers with it, and a rerun finishes the runs without "failed" rows.

These tests start a real ``marginlab sweep`` (a tiny ``train`` config on the 8x8 digits, two runs, two worker
processes), wait until both workers are training, signal the sweep process, then check that every process
the sweep had started (the workers, and multiprocessing's resource tracker) is gone within 10 s. Workers are
found by walking /proc from the sweep's pid before the signal; the pids written in the run directories'
lock files must be among them, so the processes checked are really the ones writing the runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import default_sigint, tiny_train_toml, without_log_lines

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# Long enough (about 15 s of training per run) that both workers are still training when the sweep is
# stopped, even when one worker starts seconds after the other on a loaded machine (CI once saw a resumed
# run finish its remaining 4 s of 40 epochs before the other worker had written a checkpoint).
CONFIG = tiny_train_toml(seed=4, n_train=1000, width=24, epochs=150)
EXIT_WITHIN_S = 10.0
START_TIMEOUT_S = 180.0  # two cold interpreters importing torch on a busy 2-core machine


# -- processes, from /proc -----------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and ")"
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time (to tell a reused pid apart)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[0] != "Z":
            children.setdefault(st[1], []).append((int(entry.name), st[2]))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def alive(procs: dict[int, int]) -> list[int]:
    """The pids of ``procs`` still running (a zombie has exited: only its parent has not reaped it)."""
    return [pid for pid, start in procs.items() if (st := _stat(pid)) and st[0] != "Z" and st[2] == start]


def wait_all_gone(procs: dict[int, int], timeout: float, start: float) -> float:
    """Seconds from ``start`` (``time.monotonic()``) until none of ``procs`` runs; fails after ``timeout``."""
    while alive(procs):
        if time.monotonic() - start > timeout:
            pytest.fail(f"worker processes {alive(procs)} outlived the sweep by {timeout:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - start


def kill_leftovers(procs: dict[int, int]) -> None:
    """Never leave a stray worker behind, even when an assertion failed."""
    for pid in alive(procs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- the sweep -----------------------------------------------------------------------------------
def start_sweep(config: Path, out: Path, seeds: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "marginlab", "sweep", str(config), "--grid", f"seed={seeds}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*cmd, "--jobs", "2", "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
        preexec_fn=default_sigint,  # Ctrl-C reaches it even when the suite runs in the background
    )  # fmt: skip


def checkpoint_times(runs: list[Path]) -> list[int]:
    return [(r / "checkpoint.pt").stat().st_mtime_ns if (r / "checkpoint.pt").exists() else 0 for r in runs]


def wait_training(proc: subprocess.Popen[str], runs: list[Path], before: list[int]) -> dict[int, int]:
    """Wait until every run in ``runs`` has written a new checkpoint; return the sweep's descendants."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while any(now == old for now, old in zip(checkpoint_times(runs), before, strict=True)):
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before it could be stopped: {proc.communicate()}")
        assert time.monotonic() < deadline, f"no new checkpoints after {START_TIMEOUT_S:.0f} s"
        time.sleep(0.02)
    procs = descendants(proc.pid)
    assert lock_pids(runs) <= set(procs), "the run directories are written by processes outside the sweep"
    assert len(lock_pids(runs)) == len(runs)
    return procs


def lock_pids(runs: list[Path]) -> set[int]:
    """The pids written in the runs' lock files: the processes writing those runs."""
    return {int(pid) for r in runs if (pid := (r / ".lock").read_text().strip())}


def stop(
    proc: subprocess.Popen[str], sig: signal.Signals, procs: dict[int, int], runs: list[Path], group: bool
) -> str:
    """Send ``sig`` to the sweep (``group``: to its whole process group, as Ctrl-C in a terminal does),
    check that everything it started is gone in time; return its stderr."""
    workers = {pid: start for pid, start in procs.items() if pid in lock_pids(runs)}
    try:
        start = time.monotonic()
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        workers_s = wait_all_gone(workers, EXIT_WITHIN_S, start)
        all_s = wait_all_gone(procs, EXIT_WITHIN_S, start)  # multiprocessing's tracker waits for the sweep
        _, err = proc.communicate(timeout=EXIT_WITHIN_S)
    finally:
        kill_leftovers(procs)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"{sig.name}: workers gone {workers_s:.3f} s after the signal, every process {all_s:.3f} s")
    return err


def check_stopped(proc: subprocess.Popen[str], sig: signal.Signals, err: str, out: Path, runs: list[Path]):
    """The sweep's exit and the files it leaves: unfinished runs, none recorded as failed."""
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # a one-line message and the shell's convention: 128 + the signal number
        assert proc.returncode == 128 + sig, err
        lines = without_log_lines(err)  # the workers log their epochs, tagged with their runs
        assert len(lines) == 1 and f"stopped by {sig.name}" in lines[0] and "rerun" in lines[0], err
    assert not any((r / "summary.json").exists() for r in runs), "a run finished: make the runs longer"
    statuses = {r["name"]: r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert "failed" not in statuses.values(), statuses
    if sig != signal.SIGKILL:  # a killed sweep cannot write its tables; the others say why they stopped
        assert all(statuses[r.name] == "interrupted" for r in runs), statuses
    return statuses


def rerun_to_the_end(config: Path, out: Path, seeds: str, expected_modes: list[str]) -> None:
    proc = start_sweep(config, out, seeds)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["mode"] for r in runs] == expected_modes
    assert [r["status"] for r in runs] == ["finished"] * len(runs)
    with open(out / "sweep.csv") as f:
        assert "failed" not in f.read() and "interrupted" not in (out / "sweep.md").read_text()


# -- tests ---------------------------------------------------------------------------------------
def test_ctrl_c_then_sigkill_then_rerun_finishes(tmp_path: Path) -> None:
    """One sweep stopped twice (Ctrl-C: SIGINT to its process group; then SIGKILL to the sweep alone), each
    rerun resuming it. SIGTERM takes the SIGINT path (test_sweep.py tests it in-process; the slow test
    below sends each signal to the sweep process alone)."""
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    out = tmp_path / "sw"
    runs = [out / "seed=0", out / "seed=1"]
    before = [0, 0]
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = start_sweep(config, out, "0,1")
        procs = wait_training(proc, runs, before)
        err = stop(proc, sig, procs, runs, group=sig == signal.SIGINT)
        check_stopped(proc, sig, err, out, runs)
        if sig == signal.SIGKILL:  # this sweep was a rerun: it resumed from the checkpoints left
            assert json.loads((out / "sweep.json").read_text())["runs"][0]["mode"] == "resume"
        before = checkpoint_times(runs)
    rerun_to_the_end(config, out, "0,1", ["resume", "resume"])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_each_signal_with_a_run_not_yet_started(tmp_path: Path, sig: signal.Signals) -> None:
    """Three runs on two workers: the third has not started when the sweep is stopped."""
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    out = tmp_path / "sw"
    runs = [out / "seed=0", out / "seed=1"]
    proc = start_sweep(config, out, "0,1,2")
    procs = wait_training(proc, runs, [0, 0])
    err = stop(proc, sig, procs, runs, group=False)
    statuses = check_stopped(proc, sig, err, out, runs)
    assert statuses["seed=2"] == "pending" and not (out / "seed=2").exists()
    rerun_to_the_end(config, out, "0,1,2", ["resume", "resume", "new"])
