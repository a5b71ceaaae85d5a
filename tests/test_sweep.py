"""Sweeps: grid syntax and naming, restart skipping, failure recording, worker processes, a real run.

Most tests inject a fake run function (module-level so that spawned workers can unpickle it) that
writes config.json and summary.json and appends a line to a call log, so calls can be counted across
processes. One end-to-end test runs the real ``logreg-gd`` experiment.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from marginlab.base.errors import ConfigError, RunDirError
from marginlab.cli import main as cli_main
from marginlab.sweep import (
    SweepStopped,
    parse_grid,
    plan_sweep,
    run_name,
    run_sweep,
    split_values,
    stop_signal,
)

BASE = {"kind": "fake", "seed": 0, "train": {"lr": 0.1, "epochs": 3}}


def fake_run(raw: dict[str, Any], path: Path, mode: str) -> None:
    """Writes a run directory whose summary is a known function of the config; logs the call."""
    with open(path.parent / "calls.log", "a") as f:
        f.write(f"{path.name} {mode}\n")
    if raw.get("fail") == "config":
        raise ConfigError("train.lr must be > 0")
    if raw.get("fail") == "bug":
        raise ZeroDivisionError("division by zero\nsecond line")
    if raw.get("fail") == "crash" and multiprocessing.parent_process() is not None:
        os._exit(3)  # a worker killed outright (never the test process itself)
    if raw.get("fail") == "term" and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGTERM)  # someone stopping this one worker
        time.sleep(10)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    score = raw["train"]["lr"] * 10 + raw["seed"]
    summary = {"kind": "fake", "score": score, "pid": os.getpid(), "seed": raw["seed"], "status": "ok"}
    (path / "summary.json").write_text(json.dumps(summary))


def calls(out: Path) -> list[str]:
    log = out / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def read_table(out: Path) -> list[dict[str, str]]:
    with open(out / "sweep.csv") as f:
        return list(csv.DictReader(f))


# -- grid syntax and naming ----------------------------------------------------------------------
def test_grid_parsing_keeps_brackets_and_quotes_together() -> None:
    grid = parse_grid(["train.lr=0.01, 0.002", 'data.dataset="mnist:0,1","digits"', "layers=[1,2],[3]"])
    assert grid == {
        "train.lr": ["0.01", "0.002"],
        "data.dataset": ['"mnist:0,1"', '"digits"'],
        "layers": ["[1,2]", "[3]"],
    }
    assert split_values("1") == ["1"]


@pytest.mark.parametrize(
    "items, message",
    [
        ([], "at least one --grid"),
        (["lr"], "not of the form key=v1,v2"),
        (["=1,2"], "not of the form key=v1,v2"),
        (["lr="], "empty value"),
        (["lr=1,,2"], "empty value"),
        (["train..lr=1"], "not a dotted name"),
        (["lr=[1,2"], "unbalanced"),
        (['lr="a,b'], "unbalanced"),
        (["lr=1,2", "lr=3"], "given twice"),
        (["lr=0.1,1e-1"], "same value twice"),
    ],
)
def test_bad_grid_syntax_is_a_one_line_config_error(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_grid(items)
    assert "\n" not in str(info.value)


def test_expansion_and_names() -> None:
    points = plan_sweep(BASE, parse_grid(["train.lr=0.01,0.002", "seed=0,1,2"]))
    assert [p.name for p in points] == [
        f"lr={lr},seed={s}" for lr in ("0.01", "0.002") for s in (0, 1, 2)
    ]  # first key varies slowest
    assert points[4].config == {"kind": "fake", "seed": 1, "train": {"lr": 0.002, "epochs": 3}}
    assert points[4].values == {"train.lr": 0.002, "seed": 1}
    assert BASE["train"]["lr"] == 0.1  # the base config is not modified
    # Ambiguous last key parts use the full key; unsafe characters are replaced; names stay short.
    assert run_name({"a.lr": 1, "b.lr": 2}) == "a.lr=1,b.lr=2"
    assert run_name({"data.dataset": "mnist:0,1/x y", "flag": True, "w": 1e-5}) == (
        "dataset=mnist_0_1_x_y,flag=true,w=1e-05"
    )
    long = run_name({"key": "x" * 500})
    assert len(long) <= 120 and long != run_name({"key": "x" * 499})
    # Values that collide after sanitising get a digest so that every run has its own directory.
    names = [p.name for p in plan_sweep(BASE, parse_grid(['tag="a/b","a_b"']))]
    assert len(set(names)) == 2 and all(n.startswith("tag=a_b-") for n in names)


# -- running -------------------------------------------------------------------------------------
def test_sweep_runs_every_point_and_tabulates(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    result = run_sweep(BASE, ["train.lr=0.5,0.2", "seed=0,1"], out, run_fn=fake_run, validate=False)
    assert not result.failed and len(calls(out)) == 4
    rows = read_table(out)
    assert [r["run"] for r in rows] == ["lr=0.5,seed=0", "lr=0.5,seed=1", "lr=0.2,seed=0", "lr=0.2,seed=1"]
    for r in rows:  # the table's score is the fake's known function of the grid values
        assert float(r["score"]) == pytest.approx(float(r["train.lr"]) * 10 + int(r["seed"]))
        assert r["status"] == "finished" and r["error"] == "" and "kind" not in r
    header = (out / "sweep.csv").read_text().splitlines()[0].split(",")
    assert header == ["run", "train.lr", "seed", "status", "score", "pid", "summary.status", "error"]
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["grid"] == {"train.lr": ["0.5", "0.2"], "seed": ["0", "1"]}
    assert [r["status"] for r in manifest["runs"]] == ["finished"] * 4
    assert "| lr=0.5,seed=1 | 0.5 | 1 | finished | 6 |" in (out / "sweep.md").read_text()
    # Chosen keys only (a missing one shows as empty), and a restart rewrites the table.
    run_sweep(
        BASE, ["train.lr=0.5,0.2", "seed=0,1"], out, keys=["score", "nope"], run_fn=fake_run, validate=False
    )
    assert list(read_table(out)[0]) == ["run", "train.lr", "seed", "status", "score", "nope", "error"]
    assert read_table(out)[0]["nope"] == ""


def test_restart_skips_finished_runs_and_resumes_or_restarts_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    grid = ["seed=0,1,2,3"]
    run_sweep(BASE, grid, out, run_fn=fake_run, validate=False)
    assert len(calls(out)) == 4
    run_sweep(BASE, grid, out, run_fn=fake_run, validate=False)
    assert len(calls(out)) == 4  # everything finished: nothing runs again
    (out / "seed=1" / "summary.json").unlink()  # killed before the end, no checkpoint
    (out / "seed=2" / "summary.json").unlink()  # killed with a checkpoint
    (out / "seed=2" / "checkpoint.pt").write_bytes(b"")
    from marginlab.experiments import plan_mode  # here: the spawned workers import this module, not torch

    modes = [plan_mode(out / f"seed={s}", {**BASE, "seed": s}) for s in range(5)]
    assert modes == ["skip", "resume", "resume", "skip", "new"]
    result = run_sweep(BASE, grid, out, run_fn=fake_run, validate=False)
    assert calls(out)[4:] == ["seed=1 resume", "seed=2 resume"]
    assert [r.mode for r in result.records] == ["skip", "resume", "resume", "skip"]
    assert [r["status"] for r in read_table(out)] == ["finished"] * 4
    # A grown grid runs only the new point.
    run_sweep(BASE, ["seed=0,1,2,3,4"], out, run_fn=fake_run, validate=False)
    assert calls(out)[6:] == ["seed=4 new"]


def test_a_changed_config_is_not_silently_skipped(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    run_sweep(BASE, ["seed=0,1"], out, run_fn=fake_run, validate=False)
    other = {**BASE, "train": {"lr": 0.3, "epochs": 3}}
    with pytest.raises(RunDirError, match="different config"):
        run_sweep(other, ["seed=0,1"], out, run_fn=fake_run, validate=False)
    assert len(calls(out)) == 2


def test_failing_runs_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    result = run_sweep(BASE, ['fail="no","config","bug"'], out, run_fn=fake_run, validate=False)
    assert [r.status for r in result.records] == ["finished", "failed", "failed"]
    assert len(result.failed) == 2
    rows = {r["run"]: r for r in read_table(out)}
    assert rows["fail=config"]["error"] == "train.lr must be > 0"
    assert rows["fail=bug"]["error"] == "ZeroDivisionError: division by zero"  # one line
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert "Traceback" in runs[2]["traceback"] and runs[1]["traceback"] is None


def test_two_worker_processes(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    result = run_sweep(BASE, ["seed=0,1,2"], out, jobs=2, run_fn=fake_run, validate=False)
    assert not result.failed and sorted(calls(out)) == ["seed=0 new", "seed=1 new", "seed=2 new"]
    pids = {r.summary["pid"] for r in result.records}
    assert os.getpid() not in pids and len(pids) == 3  # each run in a fresh worker process
    # A worker killed outright fails its own run only; the runs beside it and after it go on. One stopped
    # by SIGTERM did not fail: its run is interrupted (and the next sweep resumes it).
    grid = ['fail="no","crash","term","no2"', "seed=0"]
    crashed = run_sweep(BASE, grid, tmp_path / "c", jobs=2, run_fn=fake_run, validate=False)
    assert [r.status for r in crashed.records] == ["finished", "failed", "interrupted", "finished"]
    assert crashed.records[1].error == "the run's worker process failed (exit status 3)"
    assert crashed.records[2].error == "the run's worker process was stopped by SIGTERM"


def probe_run(raw: dict[str, Any], path: Path, mode: str) -> None:
    """Records how the worker process running it is set up: its parent-death signal and Ctrl-C."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    deathsig = ctypes.c_int(0)
    assert libc.prctl(2, ctypes.byref(deathsig), 0, 0, 0) == 0  # PR_GET_PDEATHSIG = 2
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C in the terminal: the worker carries on
    status = Path("/proc/self/status").read_text().splitlines()
    blocked = int(next(ln for ln in status if ln.startswith("SigBlk:")).split()[1], 16)
    path.mkdir(parents=True)
    summary = {
        "deathsig": deathsig.value,
        "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
        "sigint_blocked": bool(blocked & (1 << (signal.SIGINT - 1))),
    }
    (path / "summary.json").write_text(json.dumps(summary))


class LoadProbe:
    """A run function that records, when a worker unpickles it (which imports its module: for a real sweep
    the whole package, seconds), whether that worker was already armed to die with the sweep."""

    armed_at_load: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import ctypes

        deathsig = ctypes.c_int(0)
        ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(deathsig), 0, 0, 0)  # PR_GET_PDEATHSIG
        self.armed_at_load = deathsig.value

    def __call__(self, raw: dict[str, Any], path: Path, mode: str) -> None:
        path.mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps({"armed_at_load": self.armed_at_load}))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_workers_load_the_run_function_only_once_they_die_with_the_sweep(tmp_path: Path) -> None:
    # a sweep stopped while a worker was still importing the run function's module left that worker
    # behind for as long as the import took (the kernel's parent-death signal was not armed yet)
    result = run_sweep(BASE, ["seed=0,1"], tmp_path / "sw", jobs=2, run_fn=LoadProbe(), validate=False)
    assert [rec.summary["armed_at_load"] for rec in result.records] == [signal.SIGKILL] * 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_workers_die_with_the_sweep_and_leave_ctrl_c_to_it(tmp_path: Path) -> None:
    result = run_sweep(BASE, ["seed=0,1"], tmp_path / "sw", jobs=2, run_fn=probe_run, validate=False)
    for rec in result.records:
        assert rec.summary["deathsig"] == signal.SIGKILL  # the kernel kills it when the sweep dies
        assert rec.status == "finished" and rec.summary["sigint_ignored"]  # the sweep decides about Ctrl-C
        assert not rec.summary["sigint_blocked"]  # blocked only while the worker was starting


def interrupted_run(raw: dict[str, Any], path: Path, mode: str) -> None:
    """Like fake_run, but the first time it meets seed 1 it stops half-way, as Ctrl-C would stop it."""
    marker = path.parent / "interrupted-once"
    if raw["seed"] == 1 and not marker.exists():
        marker.touch()
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(raw))
        (path / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt
    fake_run(raw, path, mode)


def test_an_interrupted_sweep_records_no_failure_and_a_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(BASE, ["seed=0,1,2"], out, run_fn=interrupted_run, validate=False)
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["finished", "interrupted", "pending"]
    assert "stopped" in runs[1]["error"] and runs[2]["error"] is None
    assert [r["status"] for r in read_table(out)] == ["finished", "interrupted", "pending"]
    result = run_sweep(BASE, ["seed=0,1,2"], out, run_fn=interrupted_run, validate=False)
    assert [r.mode for r in result.records] == ["skip", "resume", "new"] and not result.failed
    assert [r["status"] for r in read_table(out)] == ["finished"] * 3


def stopping_run(raw: dict[str, Any], path: Path, mode: str) -> None:
    """Starts a run (config, checkpoint, its pid); seed 1 then sends SIGTERM to the sweep. Both wait."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    (path / "checkpoint.pt").write_bytes(b"")
    (path / "pid").write_text(str(os.getpid()))
    if raw["seed"] == 1:
        deadline = time.monotonic() + 5
        while not (path.parent / "seed=0" / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        (path.parent / "sigterm-sent").write_text(repr(time.time()))
        os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(5)  # the sweep stops this worker long before
    fake_run(raw, path, mode)


class _TestSigterm(Exception):
    pass


def _raise_test_sigterm(signum: int, frame: object) -> None:
    raise _TestSigterm  # never reached when the sweep handles SIGTERM itself


def test_sigterm_stops_the_workers_and_leaves_their_runs_interrupted(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    previous = signal.signal(signal.SIGTERM, _raise_test_sigterm)
    try:
        with pytest.raises(SweepStopped) as info:
            run_sweep(BASE, ["seed=0,1,2"], out, jobs=2, run_fn=stopping_run, validate=False)
        # the workers were killed, not waited for (they sleep 5 s); timed from the signal, not from the
        # start, so that slow worker start-up on a loaded machine does not count
        assert time.time() - float((out / "sigterm-sent").read_text()) < 4
        assert stop_signal(info.value) == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is _raise_test_sigterm  # the sweep's handler is gone
    finally:
        signal.signal(signal.SIGTERM, previous)
    for seed in (0, 1):
        with pytest.raises(ProcessLookupError):  # killed, and reaped by the sweep
            os.kill(int((out / f"seed={seed}" / "pid").read_text()), 0)
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["interrupted", "interrupted", "pending"]
    assert runs[0]["error"] == "the sweep was stopped by SIGTERM before this run ended"
    result = run_sweep(BASE, ["seed=0,1,2"], out, jobs=2, run_fn=fake_run, validate=False)
    assert [r.mode for r in result.records] == ["resume", "resume", "new"] and not result.failed


def test_cli_rejects_bad_input_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('kind = "logreg-gd"\nseed = 0\n')
    out = tmp_path / "sw"
    for args in (["--grid", "seed"], ["--grid", "seed=0", "--jobs", "0"], ["--grid", "seed=[0"]):
        assert cli_main(["sweep", str(cfg), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("marginlab: error:") and err.count("\n") == 1
    assert not out.exists()


# -- the real thing ------------------------------------------------------------------------------
REAL_CONFIG = """
kind = "logreg-gd"
epochs = 5
every_epoch_until = 5
[data]
dataset = "digits:0,1"
"""


def test_real_sweep_end_to_end_then_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from marginlab.report import write_report

    config = tmp_path / "c.toml"
    config.write_text(REAL_CONFIG)
    out = tmp_path / "sw"
    # One grid point only: the run itself is quick, drawing its figures is what takes seconds.
    args = ["sweep", str(config), "seed=3", "--grid", "step_fraction=0.25", "--out", str(out)]
    assert cli_main(args) == 0
    rows = read_table(out)
    assert [r["status"] for r in rows] == ["finished"]
    assert len(rows[0]) > 4  # run, grid value, status, error + at least one summary column
    assert cli_main(args) == 0  # restart: skipped
    printed = capsys.readouterr().out
    assert "finished  step_fraction=0.25 (already done)" in printed and "1/1 runs finished" in printed
    html_path, _ = write_report([out])
    n_png = len(list(out.glob("*/figures/**/*.png")))
    assert n_png > 0 and html_path.read_text().count('src="data:image/png;base64,') == n_png
