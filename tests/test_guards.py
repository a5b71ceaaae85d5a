"""Nothing finished is ever overwritten, and no two processes write one directory (issue 21, items 1, 4, 7).

- ``margins`` / ``robustness`` never write into a run directory itself nor over files they did not write;
  inside a run directory, and ``plot`` / ``report`` in one, they hold the run's lock ("in use");
- a training run writes ``summary.json`` last: a kill while plotting leaves a run ``--resume`` completes,
  and the temporary files of killed writers are removed (atomic writes, ``plot``, resume);
- a sweep directory has its lock: a second sweep (or ``run``) on it is "in use" and writes nothing; the
  second of two ``run`` on one ``--out`` is "in use" too;
- ``--resume`` refuses a run whose model file changed; ``--continue`` skips a finished run without
  importing the user's model file.
"""

from __future__ import annotations

import io
import json
import os
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    Crash,
    cli_error,
    crash_when_saving_epoch,
    tiny_train_toml,
    untrained_mlp_weights,
    write_text,
)
from marginlab.base import fsio
from marginlab.base.errors import RunDirError
from marginlab.cli import main
from marginlab.experiments import resume_experiment, run_experiment
from marginlab.lab.names import CHECKPOINT, CONFIG, FIGURES, ROBUSTNESS, SUMMARY, SWEEP_MANIFEST
from marginlab.lab.runs import RunDir
from marginlab.lab.workers import Outcome
from marginlab.sweep import run_sweep

# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``mlp`` (widths 16) for the 8x8 digits, as a state dict: enough for the commands."""
    return untrained_mlp_weights(tmp_path_factory.mktemp("w"), (16,))


def _margins(weights: Path, out: Path) -> list[str]:
    return ["margins", "--model", "mlp", "--option", "widths=[16]", "--weights", str(weights),
            "--data", "digits", "--n", "5", "--estimators", "first-order", "--out", str(out)]  # fmt: skip


def _robustness(weights: Path, out: Path) -> list[str]:
    return ["robustness", "--model", "mlp", "--option", "widths=[16]", "--weights", str(weights),
            "--data", "digits", "--n", "5", "--eps", "0.5", "--attacks", "pgd", "--steps", "2",
            "--certify", "off", "--bound", "none", "--out", str(out)]  # fmt: skip


def _fake_run(path: Path, *, finished: bool = True, **files: object) -> Path:
    """A run directory as a run leaves it (config.json, summary.json when finished, ``files`` as JSON)."""
    write_text(path / CONFIG, json.dumps({"kind": "train", "seed": 0}))
    if finished:
        (path / SUMMARY).write_text(json.dumps({"kind": "train", "findings": ["a finding"]}))
    for name, content in files.items():
        (path / name.replace("_", ".")).write_text(json.dumps(content))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real finished tiny ``train`` run (one epoch on the digits). Tests that change it copy it."""
    from marginlab.experiments import deep

    tmp = tmp_path_factory.mktemp("run")
    cfg = write_text(tmp / "t.toml", tiny_train_toml(epochs=1, n_train=200))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deep, "plot", _fake_plot)  # the figures themselves are not what these tests are about
        assert main(["run", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def _fake_plot(run_dir: Path) -> list[Path]:
    """What ``plot`` of a run does to its directory, without matplotlib: one figure, written atomically."""
    path = run_dir / FIGURES / "margins.png"
    fsio.atomic_write_bytes(path, b"PNG")
    return [path]


# --- 1. margins / robustness / plot / report --------------------------------------------------------------


def test_margins_and_robustness_never_write_into_a_run_directory(weights, tmp_path, capsys) -> None:
    run = _fake_run(tmp_path / "run")
    before = (run / SUMMARY).read_bytes()
    assert "is a run directory" in cli_error(_margins(weights, run), capsys)
    assert (run / SUMMARY).read_bytes() == before
    sub = _fake_run(tmp_path / "cmp" / "runs" / "b" / "standard-seed0", robustness_json={"reference_eps": 1})
    before = (sub / ROBUSTNESS).read_bytes()
    assert "is a run directory" in cli_error(_robustness(weights, sub), capsys)
    assert (sub / ROBUSTNESS).read_bytes() == before
    # a folder inside a run's figures/ holding the run's own robustness.png is not theirs either
    (run / FIGURES).mkdir()
    (run / FIGURES / "robustness.png").write_bytes(b"the run's figure")
    assert "did not write" in cli_error(_robustness(weights, run / FIGURES), capsys)
    assert (run / FIGURES / "robustness.png").read_bytes() == b"the run's figure"


def test_own_output_is_replaced_a_foreign_one_is_not(weights, tmp_path, capsys) -> None:
    out = tmp_path / "m"
    # an older output of margins (no written_by: told by its content) is its own, and replaced
    write_text(out / SUMMARY, json.dumps({"estimators": {}, "sign": "positive when correct"}))
    assert main(_margins(weights, out)) == 0
    assert json.loads((out / SUMMARY).read_text())["written_by"] == "marginlab margins"
    capsys.readouterr()
    # a directory holding a summary.json that margins did not write (a run's, without its config.json)
    other = tmp_path / "copied"
    write_text(other / SUMMARY, json.dumps({"kind": "train", "findings": []}))
    assert "did not write" in cli_error(_margins(weights, other), capsys)
    assert json.loads((other / SUMMARY).read_text())["kind"] == "train"
    # robustness: its own result is replaced, a comparison's (reference_eps) is not
    write_text(tmp_path / "r2" / ROBUSTNESS, json.dumps({"reference_eps": 1.0, "norm": "L2"}))
    assert "did not write" in cli_error(_robustness(weights, tmp_path / "r2"), capsys)
    rob = tmp_path / "r"
    write_text(rob / ROBUSTNESS, json.dumps({"model": "mlp", "data": "digits", "norm": "L2"}))  # older own
    assert main(_robustness(weights, rob)) == 0
    assert json.loads((rob / ROBUSTNESS).read_text())["written_by"] == "marginlab robustness"


def test_writing_inside_a_run_directory_takes_its_lock(weights, tmp_path, capsys) -> None:
    run = _fake_run(tmp_path / "run", finished=False)
    holder = RunDir(run)
    holder.lock()  # another process training it (flock: a second open file conflicts, even here)
    try:
        err = cli_error(_margins(weights, run / "eval"), capsys)
        assert "in use by another process" in err and str(os.getpid()) in err
        assert not (run / "eval").exists()
    finally:
        holder.unlock()
    assert main(_margins(weights, run / "eval")) == 0  # once it is free
    assert not (run / SUMMARY).exists()  # the run itself is untouched: still unfinished


def test_plot_and_report_take_the_run_lock(finished_run, tmp_path, capsys) -> None:
    holder = RunDir(finished_run)
    holder.lock()
    try:
        assert "in use by another process" in cli_error(["plot", str(finished_run)], capsys)
        assert "in use by another process" in cli_error(["report", str(finished_run)], capsys)
    finally:
        holder.unlock()


def test_plot_removes_the_temporary_files_of_a_killed_writer(finished_run, capsys, monkeypatch) -> None:
    from marginlab.experiments import deep

    monkeypatch.setattr(deep, "plot", _fake_plot)
    stale = finished_run / FIGURES / ".margins.png.abcd1234.tmp"
    stale.write_bytes(b"")  # what a kill -9 while saving a figure leaves
    assert main(["plot", str(finished_run)]) == 0
    assert not stale.exists() and (finished_run / FIGURES / "margins.png").is_file()


# --- 2. summary.json last; temporary files ----------------------------------------------------------------


def test_a_kill_while_plotting_leaves_a_run_that_resume_completes(tmp_path, monkeypatch) -> None:
    from marginlab.experiments import deep

    raw = tomllib.loads(tiny_train_toml(epochs=1, n_train=200))
    run = tmp_path / "run"

    def killed_while_plotting(run_dir: Path) -> list[Path]:
        (run_dir / FIGURES).mkdir(exist_ok=True)
        (run_dir / FIGURES / ".margins.png.0badf00d.tmp").write_bytes(b"")  # a kill -9 leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr(deep, "plot", killed_while_plotting)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(raw, run)
    assert not (run / SUMMARY).exists(), "a run without its figures must not be marked finished"
    assert (run / CHECKPOINT).is_file()
    monkeypatch.setattr(deep, "plot", _fake_plot)
    resume_experiment(run)
    assert (run / SUMMARY).is_file() and (run / FIGURES / "margins.png").is_file()
    assert not list(run.rglob("*.tmp"))
    newest = max(run.rglob("*"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == SUMMARY, f"{newest} was written after the summary"


def test_an_interrupted_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    """An interrupt right after the temporary file is created (where mkstemp left it behind)."""
    real_open = os.open

    def open_then_interrupt(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if str(path).endswith(fsio.TMP_SUFFIX):
            os.close(fd)
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fsio.atomic_write_text(tmp_path / "summary.json", "{}")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # zipfile's __del__
def test_an_interrupt_inside_a_writers_clean_up_stays_an_interrupt(tmp_path, monkeypatch) -> None:
    """A Ctrl-C that lands as ``np.savez_compressed`` closes a zip member comes out of numpy as
    ``ValueError: Can't close the ZIP file...`` (its clean-up fails on the half-closed member); the
    atomic write re-raises the interrupt itself, so the run stops as interrupted, with no file left."""
    signum = KeyboardInterrupt("SIGTERM")
    real_close = zipfile._ZipWriteFile.close
    calls: list[int] = []

    def interrupted_close(self: zipfile._ZipWriteFile) -> None:
        calls.append(1)
        if len(calls) == 1:  # the signal arrives as the first member is closed
            raise signum
        real_close(self)

    monkeypatch.setattr(zipfile._ZipWriteFile, "close", interrupted_close)
    with pytest.raises(ValueError, match="ZIP"):  # numpy alone turns the interrupt into its own error
        np.savez_compressed(io.BytesIO(), a=np.arange(10.0))
    calls.clear()
    with pytest.raises(KeyboardInterrupt) as caught:
        fsio.atomic_write_with(tmp_path / "m.npz", lambda f: np.savez_compressed(f, a=np.arange(10.0)))
    assert caught.value is signum  # the very interrupt, with what it carries (e.g. the signal number)
    assert list(tmp_path.iterdir()) == []


# --- 3. sweeps and runs on one --out --------------------------------------------------------------------


def _noop_run(raw: dict, path: Path, mode: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(raw))
    (path / SUMMARY).write_text(json.dumps({"kind": "fake"}))


def test_a_second_sweep_on_one_out_is_in_use_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "sw"
    first = RunDir(out)
    first.lock()  # the first sweep, still running
    try:
        with pytest.raises(RunDirError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
            run_sweep({"kind": "fake", "seed": 0}, ["seed=0,1"], out, run_fn=_noop_run, validate=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no sweep.json, no run
        cfg = write_text(
            tmp_path / "c.toml", 'kind = "logreg-gd"\nepochs = 2\n[data]\ndataset = "digits:0,1"\n'
        )
        err = cli_error(["sweep", str(cfg), "--grid", "seed=0,1", "--out", str(out)], capsys)
        assert "sweep directory" in err and "in use" in err
        assert "in use" in cli_error(["run", str(cfg), "--out", str(out)], capsys)
    finally:
        first.unlock()
    result = run_sweep({"kind": "fake", "seed": 0}, ["seed=0,1"], out, run_fn=_noop_run, validate=False)
    assert not result.failed and (out / SWEEP_MANIFEST).is_file()
    assert "run directory" in cli_error(
        ["sweep", str(cfg), "--grid", "seed=0", "--out", str(out / "seed=0")], capsys
    )


class _Attaching:
    """A launcher whose sweeps share their directory, as SLURM's do (a rerun attaches to the jobs)."""

    exclusive = False

    def execute(self, todo, run_fn, home):
        for i, (raw, path, mode) in enumerate(todo):
            yield i, None
            run_fn(raw, path, mode)
            yield i, Outcome(None)


def test_slurm_sweeps_share_their_directory_a_local_one_does_not(tmp_path) -> None:
    out = tmp_path / "sw"
    waiting = RunDir(out)
    waiting.lock("sweep directory", shared=True)  # a SLURM sweep waiting for its jobs
    try:
        base = {"kind": "fake", "seed": 0}
        result = run_sweep(base, ["seed=0"], out, run_fn=_noop_run, validate=False, launcher=_Attaching())
        assert not result.failed
        with pytest.raises(RunDirError, match="in use"):
            run_sweep(base, ["seed=0,1"], out, run_fn=_noop_run, validate=False)
    finally:
        waiting.unlock()


def test_the_second_of_two_runs_on_one_out_is_told_in_use(tmp_path, capsys) -> None:
    cfg = write_text(tmp_path / "t.toml", tiny_train_toml(epochs=1))
    first = RunDir.create(tmp_path / "run", {"kind": "train"})  # the first run, still training
    try:
        err = cli_error(["run", str(cfg), "--out", str(tmp_path / "run")], capsys)
        assert "in use by another process" in err and "--resume" not in err
    finally:
        first.unlock()


# --- 4. and 5. the user's model file ---------------------------------------------------------------------

NET_PY = """
from pathlib import Path
from torch import nn

with open(Path(__file__).with_name("imports.log"), "a") as f:  # a side effect of importing this file
    f.write("imported\\n")


class Net(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.body(x)
"""


def _user_model_config(tmp_path: Path, epochs: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    from marginlab.experiments import deep

    monkeypatch.setattr(deep, "plot", lambda run_dir: [])  # figures are not what these tests are about
    net = write_text(tmp_path / "code" / "net.py", NET_PY)
    text = tiny_train_toml(epochs=epochs, n_train=200).replace('name = "mlp"', f'name = "{net}:Net"')
    return write_text(tmp_path / "t.toml", text.replace("options = { widths = [16] }\n", ""))


def test_resume_refuses_an_edited_model_file(tmp_path, capsys, monkeypatch) -> None:
    cfg = _user_model_config(tmp_path, epochs=2, monkeypatch=monkeypatch)
    run = tmp_path / "run"
    restore = crash_when_saving_epoch(monkeypatch, 1)
    with pytest.raises(Crash):
        main(["run", str(cfg), "--out", str(run)])
    restore()
    net = tmp_path / "code" / "net.py"
    net.write_text(NET_PY.replace("nn.ReLU()", "nn.Tanh()"))  # the same weights, another architecture
    err = cli_error(["run", "--resume", str(run)], capsys)
    assert str(net) in err and "changed" in err and "--force" in err
    assert not (run / SUMMARY).exists()
    assert main(["run", "--resume", str(run), "--force"]) == 0  # the user says so: resumed as it is now
    assert (run / SUMMARY).is_file()


def test_continue_skips_a_finished_run_without_importing_the_model_file(
    tmp_path, capsys, monkeypatch
) -> None:
    cfg = _user_model_config(tmp_path, epochs=1, monkeypatch=monkeypatch)
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run)]) == 0
    log = tmp_path / "code" / "imports.log"
    imports = log.read_text()
    assert main(["run", str(cfg), "--out", str(run), "--continue"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert log.read_text() == imports, "skipping a finished run imported the user's model file"
    # a different config is still told apart (validated in full, which may import)
    assert "different config" in cli_error(
        ["run", str(cfg), "--out", str(run), "--continue", "seed=1"], capsys
    )
