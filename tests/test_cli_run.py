"""``marginlab run`` / ``marginlab plot`` end to end, on a tiny logreg-gd config (sklearn digits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marginlab.cli import main
from marginlab.experiments import logreg_gd

TINY = """\
kind = "logreg-gd"
epochs = 60
step_fraction = 0.9
every_epoch_until = 5
n_records = 8
n_snapshots = 3
n_adv_images = 2

[data]
dataset = "digits:0,1"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing where a test is about the run directory, not the figures (saves seconds)."""
    monkeypatch.setattr(logreg_gd, "plot", lambda run_dir: [])


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("marginlab: error: ") and "Traceback" not in err
    return lines[0]


def test_run_then_refuse_then_force_then_plot(config: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out)]) == 0
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file()
    assert len(list((out / "figures").glob("*.png"))) == 5
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # A finished run is never overwritten: exit 2, one line, nothing touched.
    assert main(["run", str(config), "epochs=30", "--out", str(out)]) == 2
    assert "already holds a finished run" in _one_line_error(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # --force moves it aside (never deletes it) and runs afresh with the override applied.
    monkeypatch.setattr(logreg_gd, "plot", lambda run_dir: [])  # drawn below by `marginlab plot`
    assert main(["run", str(config), "epochs=30", "--out", str(out), "--force"]) == 0
    monkeypatch.undo()
    (old,) = tmp_path.glob("run.old-*")
    assert json.loads((old / "summary.json").read_text())["epochs"] == 60
    assert json.loads((out / "summary.json").read_text())["epochs"] == 30

    # `marginlab plot` redraws every figure from the files alone.
    assert not list(out.glob("figures/*.png"))
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and all(Path(p).is_file() for p in printed)


@pytest.mark.parametrize(
    ("text", "overrides", "expect"),
    [
        (TINY, ["epoch=3"], "unknown config key 'epoch'"),
        (TINY, ["data.datset=mnist"], "unknown config key 'data.datset'"),
        (TINY, ["step_fraction=-1.2"], "step_fraction"),
        (TINY + "[oops\n", [], "malformed TOML"),
        (TINY.replace('"logreg-gd"', '"logreg-sgd"'), [], "unknown experiment kind 'logreg-sgd'"),
        (TINY.replace("digits:0,1", "digits:0,42"), [], "digits"),
    ],
    ids=[
        "unknown-key",
        "unknown-nested-key",
        "step-too-large",
        "malformed-toml",
        "unknown-kind",
        "bad-class",
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    tmp_path: Path, capsys, text: str, overrides: list, expect: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["run", str(path), *overrides, "--out", str(tmp_path / "run")]) == 2
    assert expect in _one_line_error(capsys.readouterr().err)


def test_identical_seeded_runs_are_bit_identical(config: Path, tmp_path: Path, no_figures: None) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["run", str(config), 'init="random"', "seed=3", "--out", str(out)]) == 0
    a, b = ((out / "metrics.jsonl").read_bytes() for out in outs)
    assert a == b and len(a.splitlines()) == len(logreg_gd.record_epochs(60, 5, 8))


def test_a_real_subprocess(config: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "marginlab", "run", str(config), "n_snapshots=1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "run finished" in done.stdout and (out / "summary.json").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2
    assert "already holds a finished run" in _one_line_error(again.stderr)
