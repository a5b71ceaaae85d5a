"""Helpers shared by the test files: one CPU thread, tiny configs, the CLI error contract, IDX bytes."""

from __future__ import annotations

import gzip
import importlib
import re
import signal
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slurm_fixture import slurm_cluster as slurm_cluster  # the real single-node SLURM fixture

_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")

# A tiny `train` config on scikit-learn's 8x8 digits: seconds to run, every section explicit.
TINY_TRAIN = """\
kind = "train"
seed = {seed}
[data]
dataset = "digits"
{n_train_line}[model]
name = "mlp"
options = {{ widths = [{width}] }}
[train]
epochs = {epochs}
batch_size = 32
lr = {lr}
device = "cpu"
progress = false
threads = 1
[tracking]
estimators = ["first-order"]
n_train = 120
n_test = 60
"""


def tiny_train_toml(
    *, seed: int = 0, n_train: int | None = 400, width: int = 16, epochs: int = 2, lr: float = 0.05
) -> str:
    """The text of a tiny ``train`` config (see :data:`TINY_TRAIN`); ``n_train=None``: the whole split."""
    line = "" if n_train is None else f"n_train = {n_train}\n"
    return TINY_TRAIN.format(seed=seed, n_train_line=line, width=width, epochs=epochs, lr=lr)


class Crash(Exception):
    """Raised by :func:`crash_when_saving_epoch` in place of a checkpoint write."""


def crash_when_saving_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> Callable[[], None]:
    """Make the training loop crash (:class:`Crash`) when it saves the checkpoint of ``epoch``, as a kill
    at that moment would; returns the function that puts the real save back."""
    loop = importlib.import_module("marginlab.training.loop")
    real_save = loop.save_checkpoint

    def save(path: Any, state: Any) -> None:
        if state.epoch == epoch:
            raise Crash
        real_save(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", save)
    return lambda: monkeypatch.setattr(loop, "save_checkpoint", real_save)


def default_sigint() -> None:
    """``preexec_fn`` of a child the test will Ctrl-C: SIGINT back to its default, so that Python installs
    its KeyboardInterrupt handler. A shell that starts the test suite as a background job (``cmd &``)
    ignores SIGINT, and an ignored signal stays ignored in every child (Python then never sees Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def without_log_lines(err: str) -> list[str]:
    """The lines of ``err`` that are not progress log lines (``HH:MM:SS LEVEL [run] name: ...``)."""
    return [line for line in err.strip().splitlines() if not _LOG_LINE.match(line)]


def one_line_error(code: int, err: str) -> str:
    """Assert the user-error contract (exit 2, one ``marginlab: error:`` line, no traceback); return it.

    Progress log lines (``HH:MM:SS LEVEL name: ...``, one per epoch when stderr is not a terminal) may
    precede it: they are the run's progress, not part of the error."""
    lines = without_log_lines(err)
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("marginlab: error: ") and "Traceback" not in err, err
    return lines[0]


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in this process and check the user-error contract; return the error line."""
    from marginlab.cli import main

    code = main(argv)
    return one_line_error(code, capsys.readouterr().err)


def idx_bytes(arr: np.ndarray, magic: int, *, gz: bool = False) -> bytes:
    """An IDX file (the MNIST format) holding ``arr`` (uint8), optionally gzipped."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    return gzip.compress(raw) if gz else raw


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test model is tiny: thread start-up costs more than it saves (and spins on a loaded box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def margin_values(*args, **kwargs) -> dict[str, torch.Tensor]:
    """``estimate_margins`` reduced to ``{name: values [N]}``, for tests that compare numbers only."""
    from marginlab.estimators import estimate_margins

    return {name: r.values for name, r in estimate_margins(*args, **kwargs).items()}


def untrained_mlp_weights(folder: Path, widths: tuple[int, ...] = (16,)) -> Path:
    """A seeded, untrained ``mlp`` for the 8x8 digits saved as a state dict in ``folder``: enough for the
    commands whose errors, not margins, a test is about."""
    from marginlab.nets.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), widths=widths)
    path = folder / "mlp.pt"
    torch.save(model.state_dict(), path)
    return path
