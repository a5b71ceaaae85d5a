"""The training loop against an independent hand-written SGD loop, and its building blocks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginlab.base.config import from_dict
from marginlab.base.device import resolve_device
from marginlab.base.distributed import DistContext, shard_bounds
from marginlab.base.errors import ConfigError
from marginlab.core.stats import margin_stats
from marginlab.data import load_dataset
from marginlab.nets.models import build_model
from marginlab.training.checkpoint import capture_rng, restore_rng
from marginlab.training.loop import TrainConfig, fit
from marginlab.training.progress import log_tensorboard, postfix
from marginlab.training.regularizers import AverageMargin
from marginlab.training.tracking import MarginTracker, TrackingConfig, fixed_subset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits", "train", n=300, seed=0)
    return ds.x, ds.y


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=10, input_shape=(1, 8, 8), widths=(16,))


def _reference_sgd(model, x, y, *, epochs, batch_size, lr, seed, regularizer=None):
    """An independent SGD loop written from the reference settings: Nesterov momentum 0.9, mean CE."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fit(threads=1) does, so that the float reductions match
    try:
        return _sgd_epochs(model, x, y, epochs, batch_size, lr, seed, regularizer)
    finally:
        torch.set_num_threads(threads)


def _sgd_epochs(model, x, y, epochs, batch_size, lr, seed, regularizer):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            feats = model.phi(x[idx])
            logits = model.head(feats)
            loss = F.cross_entropy(logits, y[idx])
            if regularizer is not None:
                loss = loss + regularizer(model, feats, logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.mark.parametrize("with_regularizer", [False, True], ids=["plain", "average-margin"])
def test_fit_equals_independent_sgd_loop(digits, with_regularizer):
    x, y = digits
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, device="cpu", progress=False, threads=1)
    reg = [AverageMargin(lam=0.1, gamma=5.0)] if with_regularizer else []
    ours = _model()
    records = fit(ours, x, y, cfg, lr=0.05, seed=3, device=CPU, regularizers=reg)
    ref = _reference_sgd(_model(), x, y, epochs=3, batch_size=32, lr=0.05, seed=3,
                         regularizer=reg[0] if reg else None)  # fmt: skip
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert "train_loss_epoch" not in records[0] and records[-1]["step"] == 3 * 10
    if with_regularizer:
        assert records[-1]["regularizers_epoch"]["average-margin"] < 0


def test_tracking_never_changes_training(digits):
    x, y = digits
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, device="cpu", progress=False, threads=1)
    splits = {"train": (x, y), "test": (x[:40], y[:40])}
    tracker = MarginTracker(TrackingConfig(n_train=50, n_test=20), splits, seed=0, device=CPU)
    a, b = _model(), _model()
    rec = fit(a, x, y, cfg, lr=0.05, seed=1, device=CPU, tracker=tracker)
    fit(b, x, y, cfg, lr=0.05, seed=1, device=CPU)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    m = rec[-1]["train"]["margins"]["first-order"]
    assert m["kind"] == "estimate" and rec[-1]["train"]["n"] == 50 and rec[-1]["test"]["n"] == 20
    # signed margins: the share of negative margins is the error rate of the tracked subset
    assert m["neg_share"] == pytest.approx(1 - rec[-1]["train"]["acc"])


def test_margin_stats_match_numpy():
    m = torch.randn(1001, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = margin_stats(m)
    a = m.numpy()
    assert st["min"] == a.min() and st["max"] == a.max() and st["mean"] == pytest.approx(a.mean())
    for key, q in (("q10", 0.1), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("q90", 0.9)):
        assert st[key] == pytest.approx(np.quantile(a, q))
    assert st["neg_share"] == pytest.approx((a < 0).mean())


def test_fixed_subset_is_seeded_sorted_and_full_when_asked():
    a, b = fixed_subset(100, 10, 5), fixed_subset(100, 10, 5)
    assert torch.equal(a, b) and torch.all(a[1:] > a[:-1]) and len(a) == 10
    assert not torch.equal(a, fixed_subset(100, 10, 6))
    assert torch.equal(fixed_subset(7, None, 0), torch.arange(7))


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (128, 2), (0, 2)])
def test_shards_cover_each_item_once(n, world):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:], strict=False))
    sizes = [b[1] - b[0] for b in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert [len(c) for c in torch.arange(n).tensor_split(world)] == sizes


def test_single_process_collectives_are_identity():
    ctx = DistContext()
    t = torch.arange(5.0)
    assert ctx.all_gather_shards(t, 5) is t and ctx.all_reduce_sum(t) is t and ctx.gather_objects(1) == [1]


def test_rng_capture_restores_every_stream():
    gen = torch.Generator().manual_seed(0)
    state = capture_rng(gen, CPU)
    draw = lambda: (torch.rand(3), np.random.rand(3), random.random(), torch.randperm(5, generator=gen))  # noqa: E731
    first = draw()
    restore_rng(state, gen, CPU)
    second = draw()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="train.lr must be a finite number > 0"):
        from_dict(TrainConfig, {"lr": -0.1})
    with pytest.raises(ConfigError, match="'device' must be one of"):
        from_dict(TrainConfig, {"device": "tpu"})
    with pytest.raises(ConfigError, match="tracking.p"):
        TrackingConfig(p=3)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == CPU


def test_tensorboard_is_optional():
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard") as e:
            TrainConfig(tensorboard=True)
        assert "\n" not in str(e.value)
    else:
        assert TrainConfig(tensorboard=True).tensorboard


def test_divergence_is_a_clear_error(digits):
    x, y = digits
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e30, device="cpu", progress=False, threads=1)
    with pytest.raises(ConfigError, match="diverged"):
        fit(_model(), x * 1e20, y, cfg, lr=1e30, seed=0, device=CPU)


def test_collapse_is_told_apart_from_divergence(digits):
    """A net whose ReLUs are all dead has finite loss and weights but 0/0 first-order margins: the error
    says it collapsed (not that it diverged), in one line."""
    x, y = digits
    model = _model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m is not model.head:
                m.weight.zero_()
                m.bias.fill_(-1.0)  # every hidden unit is negative before its ReLU: constant logits
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, device="cpu", progress=False, threads=1)
    tracker = MarginTracker(TrackingConfig(n_train=20, n_test=20), {"train": (x, y), "test": (x, y)},
                            seed=0, device=CPU)  # fmt: skip
    with pytest.raises(ConfigError, match="collapsed at epoch 0") as e:
        fit(model, x, y, cfg, lr=1e-3, seed=0, device=CPU, tracker=tracker)
    assert "\n" not in str(e.value) and "diverged" not in str(e.value)


class _FakeWriter:
    def __init__(self) -> None:
        self.scalars: dict[str, tuple[float, int]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = (value, step)

    def flush(self) -> None:
        pass


def test_tensorboard_scalars_and_progress_fields(digits):
    x, y = digits
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, device="cpu", progress=False, threads=1)
    tracker = MarginTracker(TrackingConfig(n_train=30, n_test=30), {"train": (x, y), "test": (x, y)},
                            seed=0, device=CPU)  # fmt: skip
    rec = fit(_model(), x, y, cfg, lr=0.05, seed=0, device=CPU, tracker=tracker)[-1]
    writer = _FakeWriter()
    log_tensorboard(writer, rec)
    assert writer.scalars["epoch/train_loss"] == (rec["train_loss_epoch"], 1)
    assert writer.scalars["test/acc"] == (rec["test"]["acc"], 1)
    assert writer.scalars["margin/train/first-order/min"] == (
        rec["train"]["margins"]["first-order"]["min"],
        1,
    )
    fields = postfix(rec)
    assert set(fields) == {"loss", "train_acc", "test_acc", "test first-order min/mean"}
    assert fields["loss"] == f"{rec['train_loss_epoch']:.4f}"


def test_a_run_piped_to_a_file_logs_one_line_per_epoch(tmp_path) -> None:
    """Not a terminal (nohup, a scheduler): one INFO line per epoch, with labelled accuracies and the
    margin's kind; ``-v`` adds no third-party debug noise; ``-q`` keeps marginlab to warnings."""
    import logging
    import subprocess
    import sys

    from conftest import tiny_train_toml, write_text
    from marginlab.base.logs import setup_logging

    cfg = write_text(
        tmp_path / "t.toml", tiny_train_toml(epochs=2).replace("progress = false", "progress = true")
    )
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "marginlab", "-v", "run", str(cfg), "--out", str(out)]
    lines = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stderr.splitlines()
    epochs = [line for line in lines if "marginlab.training.loop" in line and " epoch " in line]
    assert [line.split(" epoch ")[1].split()[0] for line in epochs] == ["0/2", "1/2", "2/2"]
    assert all("train acc" in line and "test acc" in line and "(estimate)" in line for line in epochs)
    assert all(" marginlab" in line for line in lines if line[:2].isdigit())  # -v: marginlab's own only
    setup_logging(logging.WARNING)  # what -q sets
    assert logging.getLogger("marginlab.training.loop").getEffectiveLevel() == logging.WARNING
    setup_logging(logging.INFO)


def test_mixed_precision_trains_close_to_float32(tmp_path) -> None:
    """``train.amp``: bfloat16 forward passes; the run trains, and its loss stays near float32's."""
    from conftest import tiny_train_toml, write_text
    from marginlab.cli import main
    from marginlab.lab.runs import read_summary

    cfg = write_text(tmp_path / "t.toml", tiny_train_toml(epochs=3))
    losses = {}
    for amp in ("false", "true"):
        out = tmp_path / f"amp-{amp}"
        assert main(["run", str(cfg), "--out", str(out), f"train.amp={amp}"]) == 0
        losses[amp] = read_summary(out)["final_train_loss"]
    assert losses["true"] != losses["false"]  # it really ran in another precision
    assert abs(losses["true"] - losses["false"]) < 0.05 * losses["false"]
