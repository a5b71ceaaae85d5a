"""Kill-and-resume: a run killed at any moment and resumed ends identical to an uninterrupted one (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import marginlab.training.loop
from conftest import tiny_train_toml
from marginlab.base.config import load_config, to_dict
from marginlab.base.errors import RunDirError
from marginlab.base.fsio import read_jsonl
from marginlab.experiments import build_config, resume_experiment, run_experiment
from marginlab.lab.runs import RunDir, read_summary


def _write_config(tmp_path: Path, epochs: int) -> Path:
    path = tmp_path / f"tiny-{epochs}.toml"
    path.write_text(tiny_train_toml(seed=4, n_train=None, width=24, epochs=epochs))
    return path


def _strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def assert_same_run(a: Path, b: Path) -> None:
    """Metrics (minus wall-clock times), summary, per-point margins and final weights are identical."""
    ra, rb = _strip_time(read_jsonl(a / "metrics.jsonl")), _strip_time(read_jsonl(b / "metrics.jsonl"))
    assert [r["epoch"] for r in rb] == [r["epoch"] for r in ra]
    assert rb == ra
    assert read_summary(b) == read_summary(a)
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    npz_a = sorted(p.name for p in (a / "margins").iterdir())
    assert npz_a == sorted(p.name for p in (b / "margins").iterdir())
    for name in npz_a:
        with np.load(a / "margins" / name) as za, np.load(b / "margins" / name) as zb:
            assert all(np.array_equal(za[k], zb[k]) for k in za.files)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs, keyed by their number of epochs."""
    out = {}
    for epochs in (6, 40):
        tmp = tmp_path_factory.mktemp(f"ref{epochs}")
        out[epochs] = run_experiment(load_config(_write_config(tmp, epochs)), tmp / "run")
    return out


def test_sigkill_then_resume_is_identical(tmp_path, reference):
    cfg = _write_config(tmp_path, 40)
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "marginlab", "run", str(cfg), "--out", str(run)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        time.sleep(0.3)  # mid-training: somewhere inside a later epoch
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        # a second writer while the first one runs: the lock refuses it with a clear one-line error
        with pytest.raises(RunDirError, match=r"in use by another process \(pid \d+\)"):
            resume_experiment(run)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    killed_after = len(read_jsonl(run / "metrics.jsonl"))
    assert 1 <= killed_after < 41
    resume_experiment(run)
    assert_same_run(reference[40], run)


class _Crash(Exception):
    pass


def test_crash_between_metrics_and_checkpoint(tmp_path, reference, monkeypatch):
    """The worst moment: epoch 3's metrics line is written (plus a torn line), its checkpoint is not."""
    real_save = marginlab.training.loop.save_checkpoint

    def save(path, ckpt):
        if ckpt.epoch == 3:
            with open(Path(path).parent / "metrics.jsonl", "a") as f:
                f.write('{"epoch": 4, "torn')
            raise _Crash
        real_save(path, ckpt)

    monkeypatch.setattr(marginlab.training.loop, "save_checkpoint", save)
    run = tmp_path / "crashed"
    with pytest.raises(_Crash):
        run_experiment(load_config(_write_config(tmp_path, 6)), run)
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]
    monkeypatch.setattr(marginlab.training.loop, "save_checkpoint", real_save)
    resume_experiment(run)
    assert_same_run(reference[6], run)


def test_resume_before_first_checkpoint_starts_over(tmp_path, reference):
    """Killed before the first checkpoint: config.json and a torn metrics line, nothing else."""
    kind, cfg = build_config(load_config(_write_config(tmp_path, 6)))
    run = tmp_path / "early"
    with RunDir.create(run, {"kind": kind, **to_dict(cfg)}):
        (run / "metrics.jsonl").write_text('{"epoch": 0, "st')
    resume_experiment(run)
    assert_same_run(reference[6], run)


def test_corrupt_checkpoint_and_finished_run_are_clear_errors(tmp_path, reference):
    with pytest.raises(RunDirError, match="already finished"):
        resume_experiment(reference[6])
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "config.json").write_text((reference[6] / "config.json").read_text())
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError, match="checkpoint .* is unreadable"):
        resume_experiment(run)
