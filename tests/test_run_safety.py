"""Runs never lose work: interrupted comparisons resume, every damaged file is a one-line error naming it,
a full disk leaves the last checkpoint loadable, a diverged run stops, ``--force`` moves only run
directories, and a run directory records the values and versions that produced it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_error, default_sigint, one_line_error, tiny_train_toml, write_text
from marginlab.cli import main
from marginlab.lab.runs import CHECKPOINT, METRICS, PROVENANCE, SUMMARY, margins_files, subrun_dir
from marginlab.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

COMPARE = """\
kind = "compare"
recipes = ["standard", "regularized"]
seeds = [0]

[[bases]]
name = "digits"
preset = "{preset}"
eps = 1.0
overrides = {{ "regularizer.gamma" = 2.0 }}
{extra_base}
[robustness]
n = 20
steps = 5
step_size_rel = 0.25
sweep = [1.0]
bound = "deepfool"
attacks = ["pgd"]
"""


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """``marginlab ARGS`` in a real process (signals need one), output captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "marginlab", *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=default_sigint,  # Ctrl-C reaches it even when the suite runs in the background
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


# -- 1. an interrupted comparison keeps its finished sub-runs and resumes ---------------------------------
@pytest.mark.parametrize(
    "sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_interrupted_compare_keeps_finished_subruns_and_resumes(tmp_path: Path, sig: int, code: int) -> None:
    # 40 epochs: the second sub-run is still training when the signal comes, even on a loaded machine
    preset = write_text(tmp_path / "base.toml", tiny_train_toml(epochs=40, n_train=200))
    cfg = write_text(tmp_path / "cmp.toml", COMPARE.format(preset=preset, extra_base=""))
    out = tmp_path / "cmp"
    proc = _cli("run", str(cfg), "--out", str(out), cwd=tmp_path)
    first = subrun_dir(out, "digits", "standard", 0)
    _wait_for(first / "robustness.json", proc)  # the first sub-run is trained and evaluated
    _wait_for(subrun_dir(out, "digits", "regularized", 0) / CHECKPOINT, proc)  # the second is training
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert (first / SUMMARY).is_file(), "a finished sub-run was deleted"
    kept = {p: p.read_bytes() for p in first.rglob("*") if p.is_file() and p.name != ".lock"}

    assert main(["run", "--resume", str(out)]) == 0
    assert (out / SUMMARY).is_file()
    assert {p: p.read_bytes() for p in kept} == kept, "resume redid a finished sub-run"
    assert (subrun_dir(out, "digits", "regularized", 0) / SUMMARY).is_file()
    modes = [s["mode"] for s in json.loads((out / PROVENANCE).read_text())["sessions"]]
    assert modes == ["new", "resume"]


def test_compare_checks_every_base_before_training(tmp_path: Path, capsys) -> None:
    preset = write_text(tmp_path / "base.toml", tiny_train_toml())
    missing = tmp_path / "no-data"
    missing.mkdir()
    later = (
        f'\n[[bases]]\nname = "cifar"\npreset = "{preset}"\neps = 1.0\n'
        f'overrides = {{ "data.dataset" = "cifar10", "data.data_dir" = "{missing}", '
        '"regularizer.gamma" = 2.0 }\n'
    )
    cfg = write_text(tmp_path / "cmp.toml", COMPARE.format(preset=preset, extra_base=later))
    err = cli_error(["run", str(cfg), "--out", str(tmp_path / "cmp")], capsys)
    assert "base 'cifar'" in err and "cifar" in err.lower()
    assert not (tmp_path / "cmp").exists(), "nothing trained, so nothing may be left behind"


# -- 2. damaged files of a run directory: one line naming the file ---------------------------------------
@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    cfg = write_text(tmp_path / "t.toml", tiny_train_toml(epochs=3))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    return out


def _unfinish(run: Path) -> None:
    (run / SUMMARY).unlink()


def test_torn_last_metrics_line_is_recovered_silently(finished_run: Path) -> None:
    _unfinish(finished_run)
    with open(finished_run / METRICS, "a") as f:
        f.write('{"epoch": 4, "tr')  # a kill mid-append
    assert main(["run", "--resume", str(finished_run)]) == 0
    assert [json.loads(line)["epoch"] for line in (finished_run / METRICS).read_text().splitlines()] == [
        0, 1, 2, 3,
    ]  # fmt: skip


def test_torn_middle_metrics_line_names_file_and_line(finished_run: Path, capsys) -> None:
    lines = (finished_run / METRICS).read_text().splitlines()
    lines[1] = lines[1][:20]
    (finished_run / METRICS).write_text("\n".join(lines) + "\n")
    err = cli_error(["plot", str(finished_run)], capsys)
    assert "metrics.jsonl line 2" in err
    _unfinish(finished_run)
    err = cli_error(["run", "--resume", str(finished_run)], capsys)
    assert "metrics.jsonl line 2" in err


def test_corrupt_margins_file_names_it(finished_run: Path, capsys) -> None:
    path = next(iter(margins_files(finished_run).values()))
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert path.name in cli_error(["plot", str(finished_run)], capsys)


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda run: (run / "config.json").write_text("[1, 2]"), "config.json"),
        (lambda run: (run / "config.json").write_text("{not json"), "config.json"),
        (
            lambda run: (run / "config.json").write_text(
                (run / "config.json").read_text().replace('"widths": [\n        16', '"widths": [\n        8')
            ),
            "does not fit the model",
        ),
        (lambda run: (run / CHECKPOINT).write_bytes(b"garbage"), "checkpoint"),
    ],
    ids=["config-not-object", "config-not-json", "config-edited-architecture", "checkpoint-garbage"],
)
def test_damaged_run_directory_resume_is_one_line(finished_run: Path, capsys, damage, needle: str) -> None:
    _unfinish(finished_run)
    damage(finished_run)
    assert needle in cli_error(["run", "--resume", str(finished_run)], capsys)


LOGREG = """\
kind = "logreg-gd"
epochs = 40
every_epoch_until = 5
n_records = 5
n_snapshots = 2
n_adv_images = 2
[data]
dataset = "digits:0,1"
"""


@pytest.mark.parametrize("victim", ["svm.npz", CHECKPOINT])
def test_logreg_resume_uses_the_guarded_loaders(tmp_path: Path, capsys, victim: str) -> None:
    cfg = write_text(tmp_path / "lr.toml", LOGREG)
    run = tmp_path / "lr"
    assert main(["run", str(cfg), "--out", str(run)]) == 0
    ckpt = load_checkpoint(run / CHECKPOINT)  # the common checkpoint format, weights only
    assert ckpt.epoch == 40 and set(ckpt.model) == {"w", "b"}
    _unfinish(run)
    (run / victim).write_bytes(b"\x00" * 10)
    assert victim in cli_error(["run", "--resume", str(run)], capsys)


# -- 3. outputs that cannot be written -------------------------------------------------------------------
def test_bad_out_paths(tmp_path: Path, capsys, monkeypatch) -> None:
    cfg = write_text(tmp_path / "t.toml", tiny_train_toml())
    (tmp_path / "afile").write_text("x")
    assert "existing file" in cli_error(["run", str(cfg), "--out", str(tmp_path / "afile")], capsys)
    monkeypatch.chdir(tmp_path)
    assert "current directory" in cli_error(["run", str(cfg), "--out", "."], capsys)
    assert "longer than" in cli_error(["run", str(cfg), "--out", "x" * 300], capsys)


def test_force_moves_only_run_directories(tmp_path: Path, capsys) -> None:
    cfg = write_text(tmp_path / "t.toml", tiny_train_toml())
    home = tmp_path / "home"
    write_text(home / "thesis.tex", "precious")
    assert "not one" in cli_error(["run", str(cfg), "--out", str(home), "--force"], capsys)
    assert (home / "thesis.tex").read_text() == "precious" and not list(tmp_path.glob("home.old-*"))


def test_resume_removes_leftover_temp_files(finished_run: Path) -> None:
    _unfinish(finished_run)
    leftover = finished_run / ".checkpoint.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert main(["run", "--resume", str(finished_run)]) == 0
    assert not leftover.exists()


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 600 kB tmpfs (root only): room for a run's first checkpoint, not for a second beside it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, tiny_disk: Path) -> None:
    # widths 512: a checkpoint of ~0.35 MB (weights + momentum): the second one cannot be written beside it
    cfg = write_text(tmp_path / "t.toml", tiny_train_toml(epochs=6, width=512))
    run = tiny_disk / "run"
    proc = _cli("run", str(cfg), "--out", str(run), cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    line = one_line_error(proc.returncode, err)
    assert "no space left on device" in line and str(tiny_disk) in line
    ckpt = load_checkpoint(run / CHECKPOINT)  # the last good one is intact
    assert ckpt.epoch >= 0
    assert not list(run.rglob("*.tmp")), "a failed atomic write left its temporary file"


# -- 4. divergence ---------------------------------------------------------------------------------------
def test_diverged_training_stops_with_one_line(tmp_path: Path, capsys) -> None:
    cfg = write_text(tmp_path / "t.toml", tiny_train_toml(epochs=3))
    err = cli_error(["run", str(cfg), "--out", str(tmp_path / "r"), "train.lr=1e6"], capsys)
    # lr 1e6 kills every ReLU in one epoch (finite loss and weights, constant logits): "collapsed"
    assert re.search(r"training (diverged|collapsed) at epoch 1\b.*lower train\.lr", err)
    assert not (tmp_path / "r" / SUMMARY).exists()


# -- 5. what ran is recorded; checkpoints stay small -----------------------------------------------------
def test_config_holds_resolved_values_and_provenance(tmp_path: Path) -> None:
    text = (
        tiny_train_toml().replace("lr = 0.05\n", "") + '[regularizer]\nrecipe = "regularized"\ngamma = 2.0\n'
    )
    cfg = write_text(tmp_path / "t.toml", text)
    run = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["lr"] == 0.002  # the reference rate of the regularized recipe
    assert (saved["regularizer"]["lam"], saved["regularizer"]["gamma"], saved["regularizer"]["beta"]) == (
        0.1, 2.0, 1e-3,
    )  # fmt: skip
    (session,) = json.loads((run / PROVENANCE).read_text())["sessions"]
    assert session["marginlab"] and session["packages"]["torch"].startswith("2.13.0")
    assert session["packages"]["foolbox"] and session["command"][1:3] == ["run", str(cfg)]
    assert session["torch_threads"] >= 1 and "cuda" in session


def test_checkpoint_does_not_grow_with_the_run(tmp_path: Path) -> None:
    sizes = {}
    for epochs in (2, 12):
        cfg = write_text(tmp_path / f"t{epochs}.toml", tiny_train_toml(epochs=epochs))
        run = tmp_path / f"r{epochs}"
        assert main(["run", str(cfg), "--out", str(run)]) == 0
        raw = torch.load(run / CHECKPOINT, weights_only=True)
        assert "records" not in raw
        sizes[epochs] = (run / CHECKPOINT).stat().st_size
    assert abs(sizes[12] - sizes[2]) < 64, sizes


def test_continue_runs_resumes_or_skips(tmp_path: Path, capsys) -> None:
    cfg = write_text(tmp_path / "t.toml", tiny_train_toml(epochs=3))
    run = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(run), "--continue"]) == 0
    summary = (run / SUMMARY).read_bytes()
    assert main(["run", str(cfg), "--out", str(run), "--continue"]) == 0  # finished: skipped
    assert (run / SUMMARY).read_bytes() == summary and "already finished" in capsys.readouterr().out
    _unfinish(run)
    assert main(["run", str(cfg), "--out", str(run), "--continue"]) == 0  # unfinished: resumed
    assert (run / SUMMARY).is_file()
    assert [s["mode"] for s in json.loads((run / PROVENANCE).read_text())["sessions"]] == ["new", "resume"]
    assert "different config" in cli_error(
        ["run", str(cfg), "--out", str(run), "--continue", "seed=1"], capsys
    )
