"""Sweeps and comparisons through the real single-node SLURM of ``tests/slurm_fixture.py``.

The reference is the same sweep or comparison run locally: every file of every run directory must say the
same, value by value and bit for bit, timings and provenance aside (``scripts/diff_runs.py``), and so must
the tables. In the sweep, one task is requeued hard in mid-run (``scontrol requeue``, its process killed
as SLURM does after KillWait) and the other preempted gracefully (SIGTERM + USR2: submitit calls the
task's ``checkpoint`` and requeues it); both must resume from their run's checkpoint, which their
``provenance.json`` shows (a ``resume`` session), and still equal the uninterrupted local runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_train_toml, write_text
from marginlab.base.config import load_config
from marginlab.base.fsio import read_json
from marginlab.cli import main as cli_main
from marginlab.lab.status import run_statuses
from marginlab.sweep import run_sweep
from slurm_fixture import SlurmCluster

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 10  # long enough to be interrupted after its first epoch, short enough for the test's budget
_spec = importlib.util.spec_from_file_location("diff_runs", ROOT / "scripts" / "diff_runs.py")
assert _spec is not None and _spec.loader is not None
diff_runs: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diff_runs)


def _sessions(run: Path) -> list[str]:
    return [s["mode"] for s in read_json(run / "provenance.json")["sessions"]]


def _last_epoch(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["epoch"] if lines else -1
    except (OSError, ValueError, KeyError):
        return -1


def _interrupt_both(cluster: SlurmCluster, home: Path, proc: subprocess.Popen[str]) -> list[Any]:
    """Requeue seed=0 hard and preempt seed=1 gracefully, each after its first epoch; the statuses seen
    while they ran."""
    seen: list[Any] = []
    jobs: list[str] = []
    todo = {"seed=0", "seed=1"}
    deadline = time.monotonic() + 90
    while todo:
        assert proc.poll() is None, f"the sweep ended before its runs were interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, f"runs {todo} never reached epoch 1"
        for name in sorted(todo):
            if _last_epoch(home / name) < 1:
                continue
            job = read_json(home / "launch.json")["runs"][name]["job_id"]
            seen.append({s.name: s for s in run_statuses(home)}[name])
            if name == "seed=0":
                pid = int((home / name / ".lock").read_text())  # the task's process holds the run's lock
                cluster.run("scontrol", "requeue", job)
                os.kill(pid, signal.SIGKILL)  # what SLURM does after KillWait, without waiting for it
            else:
                cluster.preempt(job)
            jobs.append(job)
            todo.discard(name)
        time.sleep(0.05)
    for job in jobs:  # not before both are interrupted: a run may not finish meanwhile
        cluster.start_now(job)
    return seen


def test_a_sweep_on_slurm_survives_requeues_and_equals_the_local_sweep(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    config = write_text(tmp_path / "tiny.toml", tiny_train_toml(epochs=EPOCHS))
    home = tmp_path / "slurm-sweep"
    argv = ["sweep", str(config), "--grid", "seed=0,1", "--out", str(home), "--launcher", "slurm",
            "--partition", slurm_cluster.partition, "--time", "5", "--cpus-per-task", "1", "--mem", "1G",
            "--slurm-poll", "0.5"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "marginlab", *argv], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        seen = _interrupt_both(slurm_cluster, home, proc)
        # the same command while both jobs are requeued: it attaches to them, submits nothing
        assert cli_main([*argv, "--no-wait"]) == 0
        assert len(list((home / "slurm").glob("*_submission.sh"))) == 1
        local = run_sweep(load_config(config), ["seed=0,1"], tmp_path / "local-sweep")  # meanwhile
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not local.failed
    assert [(s.state, s.epoch is not None and s.epoch >= 1) for s in seen] == [("running", True)] * 2, [
        (s.name, s.state, s.epoch) for s in seen
    ]
    for name in ("seed=0", "seed=1"):
        assert _sessions(home / name) == ["new", "resume"], name  # interrupted mid-run, resumed
        assert diff_runs.diff_trees(home / name, tmp_path / "local-sweep" / name) == [], name
    assert (home / "sweep.csv").read_text() == (tmp_path / "local-sweep" / "sweep.csv").read_text()
    jobs = read_json(home / "launch.json")["runs"]
    assert {r["status"] for r in jobs.values()} == {"finished"}
    assert "SLURM job" in err and "started run" in err  # the progress the submitting command prints

    statuses = run_statuses(home)
    assert [(s.name, s.state, s.epoch, s.total) for s in statuses] == [
        ("seed=0", "finished", EPOCHS, EPOCHS), ("seed=1", "finished", EPOCHS, EPOCHS),
    ]  # fmt: skip
    assert [s.job_id for s in statuses] == [jobs["seed=0"]["job_id"], jobs["seed=1"]["job_id"]]
    assert all(Path(str(s.log)).is_file() for s in statuses)

    # The same command again: everything finished, nothing is submitted.
    before = sorted(p.name for p in (home / "slurm").iterdir())
    assert cli_main(argv) == 0
    assert sorted(p.name for p in (home / "slurm").iterdir()) == before


COMPARE_TOML = """\
kind = "compare"
recipes = ["standard", "constraint"]
launcher = "slurm"
[[bases]]
name = "tiny"
preset = "base.toml"
eps = 1.0
[robustness]
n = 20
bound = "none"
attacks = ["pgd"]
steps = 5
sweep = [1.0]
[slurm]
partition = "{partition}"
time = 5
cpus_per_task = 1
mem = "1G"
poll_s = 0.5
"""


def _without_costs(table: Path) -> list[list[str]]:
    """The cells of a Markdown table but its last four columns (seconds per epoch and their ratios)."""
    return [line.split("|")[:-5] if "|" in line else [line] for line in table.read_text().splitlines()]


def test_a_comparison_on_slurm_equals_the_local_one(
    slurm_cluster: SlurmCluster, tmp_path: Path, capsys: Any
) -> None:
    write_text(tmp_path / "base.toml", tiny_train_toml(epochs=2) + "[regularizer]\nbeta = 1e-3\n")
    config = write_text(tmp_path / "cmp.toml", COMPARE_TOML.format(partition=slurm_cluster.partition))
    local = subprocess.Popen(  # the reference, meanwhile, in a process of its own
        [sys.executable, "-m", "marginlab", "run", str(config), "--out", "here", "launcher=local"],
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the preset is found relative to the working directory
    try:
        assert cli_main(["run", str(config), "--out", "on-slurm"]) == 0
        _, err = local.communicate(timeout=120)
    finally:
        os.chdir(cwd)
        if local.poll() is None:
            local.kill()
    assert local.returncode == 0, err
    slurm_dir, local_dir = tmp_path / "on-slurm", tmp_path / "here"
    for recipe in ("standard", "constraint"):
        sub = Path("runs") / "tiny" / f"{recipe}-seed0"
        assert diff_runs.diff_trees(slurm_dir / sub, local_dir / sub) == [], recipe
    for table in ("table.csv", "sweep.csv"):
        assert (slurm_dir / table).read_text() == (local_dir / table).read_text(), table
    # every value but the training times (table.md's cost columns; the Pareto figure's marker sizes)
    differences: list[str] = []
    diff_runs._same(*(read_json(d / "summary.json") for d in (slurm_dir, local_dir)), "summary", differences)
    assert differences == []
    assert _without_costs(slurm_dir / "table.md") == _without_costs(local_dir / "table.md")

    capsys.readouterr()
    assert cli_main(["status", str(slurm_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    jobs = read_json(slurm_dir / "launch.json")["runs"]
    for recipe in ("standard", "constraint"):
        name = f"runs/tiny/{recipe}-seed0"
        assert [name, "finished", "2/2", jobs[name]["job_id"], jobs[name]["log"]] in [
            ln.split() for ln in lines
        ]
    assert lines[-1].endswith("2 runs: 2 finished")
