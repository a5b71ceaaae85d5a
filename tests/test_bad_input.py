"""Every CLI command driven with wrong input: exit 2, one line naming the problem, no traceback, and no
partial output left behind. (Commands are called in-process through ``marginlab.cli.main``; an exception
other than a user error would escape and fail the test. One case runs a real subprocess.)"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marginlab.cli import main

TINY = """kind = "logreg-gd"
epochs = 2
[data]
dataset = "digits:0,1"
"""


def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, assert the user-error contract, return the error line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("marginlab: error: ") and "Traceback" not in err
    return err


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    return _write(tmp_path / "tiny.toml", TINY)


@pytest.mark.parametrize(
    "toml, overrides, needle",
    [
        ('kind = "nope"\n', [], "unknown experiment kind 'nope'"),
        ("epochs = 2\n", [], "no 'kind'"),
        ('kind = "logreg-gd"\nepochs = [\n', [], "malformed TOML"),
        (TINY, ["epochz=3"], "unknown config key 'epochz'"),
        (TINY, ["epochs=-1"], "epochs"),
        (TINY, ["step_fraction=nan"], "step_fraction"),
        (TINY, ["data.dataset=imagenet"], "unknown dataset 'imagenet'"),
        (TINY, ["data.dataset=digits:0,11"], "11"),
        (TINY, ["data=3"], "data must be a table"),
        (TINY, ["novalue"], "not of the form key.sub=value"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_run_rejects_bad_configs(tmp_path, capsys, toml, overrides, needle):
    config = _write(tmp_path / "c.toml", toml)
    out = tmp_path / "out"
    err = _fail(["run", config, *overrides, "--out", str(out)], capsys)
    assert needle in err
    assert not out.exists()  # nothing half-made


def test_run_missing_config_and_unwritable_out(tmp_path, tiny, capsys):
    assert "config file not found" in _fail(["run", str(tmp_path / "none.toml")], capsys)
    target = "/proc/marginlab-no" if os.geteuid() == 0 else "/marginlab-no/run"
    assert "cannot" in _fail(["run", tiny, "--out", target], capsys)


def test_run_with_missing_data_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MARGINLAB_DATA", str(tmp_path / "empty"))
    config = _write(tmp_path / "c.toml", TINY.replace("digits:0,1", "cifar10:0,1"))
    out = tmp_path / "out"
    err = _fail(["run", config, "--out", str(out)], capsys)
    assert "CIFAR-10 not found" in err and "cifar-10-batches-bin" in err
    assert not out.exists()


def test_resume_and_plot_of_non_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "not a marginlab run directory" in _fail(["run", "--resume", str(tmp_path / "empty")], capsys)
    assert "not a marginlab run directory" in _fail(["plot", str(tmp_path / "empty")], capsys)
    assert "give a CONFIG" in _fail(["run"], capsys)


def test_report_of_corrupt_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"kind": "logreg-gd"')  # torn JSON
    out = tmp_path / "report"
    assert "corrupt" in _fail(["report", str(run), "--out", str(out)], capsys)
    assert not (out / "report.html").exists()


def test_sweep_bad_grid(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert "grid" in _fail(["sweep", tiny, "--grid", "epochs", "--out", str(out)], capsys).lower()
    assert not (out / "sweep.csv").exists()


def test_data_errors(tmp_path, capsys):
    assert "unknown dataset 'imagenet'" in _fail(["data", "check", "imagenet"], capsys)
    bad = tmp_path / "fashion-mnist"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(bad / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03garbage")  # right magic, truncated header
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (bad / name).write_bytes(b"not gzip at all")
    err = _fail(["data", "check", "fashion-mnist", "--data-dir", str(tmp_path)], capsys)
    assert "fashion" in err.lower() or "idx" in err.lower()


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err


def test_real_subprocess_prints_no_traceback(tmp_path):
    config = _write(tmp_path / "c.toml", 'kind = "logreg-gd"\nepochs = -3\n')
    proc = subprocess.run(
        [sys.executable, "-m", "marginlab", "run", config, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    json.dumps(proc.stderr)  # printable
