"""Tracking on a log-spaced grid of optimizer steps (``tracking.every = "log"``) and the output-space
margins tracked beside the estimates (``logit_margin``, ``normalised_margin``).

References: the grid index is checked against exact integer arithmetic (10^j <= s^per_decade), the
logit margin against a per-point loop, and the normalised margin against the homogeneity it exists for
(scaling every weight of a bias-free ReLU net leaves it unchanged)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_train_toml, write_text
from marginlab.base.config import load_config
from marginlab.base.errors import ConfigError
from marginlab.experiments import run_experiment
from marginlab.lab.names import WEIGHTS
from marginlab.lab.readers import read_metrics
from marginlab.training.tracking import (
    TrackingConfig,
    log_grid_index,
    logit_margin,
    weight_norm_product,
)


def _grid_index_exact(step: int, per_decade: int) -> int:
    """#{j >= 0 : 10^(j/per_decade) <= step}, in integers: 10^j <= step^per_decade."""
    if step < 1:
        return 0
    j = 0
    while 10 ** (j + 1) <= step**per_decade:
        j += 1
    return j + 1


@pytest.mark.parametrize("per_decade", [1, 3, 10, 20])
def test_log_grid_index_is_exact(per_decade: int) -> None:
    steps = [*range(0, 130), 999, 1000, 1001, 9999, 10_000, 10_001, 20_000, 100_000]
    assert [log_grid_index(s, per_decade) for s in steps] == [_grid_index_exact(s, per_decade) for s in steps]


def test_log_schedule_tracks_each_new_grid_point_once() -> None:
    cfg = TrackingConfig(every="log", per_decade=10, save_margins_every=5)
    last, spe = 1250, 16  # 20,000 steps
    tracked = [e for e in range(last + 1) if cfg.tracks(e, last, spe)]
    assert tracked[:3] == [0, 1, 2] and tracked[-1] == last
    # every tracked epoch after the first reaches a new grid point; every grid point is reached once
    for e in tracked[1:-1]:
        assert log_grid_index(e * spe, 10) > log_grid_index((e - 1) * spe, 10)
    assert len(tracked) <= log_grid_index(last * spe, 10) + 2
    assert 28 <= len(tracked) <= 45  # 10 per decade over 4.3 decades, the first 1.2 inside epoch 1
    saved = [e for e in range(last + 1) if cfg.saves(e, last, spe)]
    assert set(saved) <= set(tracked) and {0, 1, last} <= set(saved) and len(saved) < len(tracked) / 3


def test_epoch_schedule_unchanged() -> None:
    cfg = TrackingConfig(every=3, save_margins_every=2)
    assert [e for e in range(11) if cfg.tracks(e, 10, 16)] == [0, 1, 3, 6, 9, 10]
    assert [e for e in range(11) if cfg.saves(e, 10, 16)] == [0, 1, 6, 10]


@pytest.mark.parametrize(("kw", "match"), [({"every": "often"}, "every"), ({"per_decade": 0}, "per_decade")])
def test_bad_schedule(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrackingConfig(**kw)  # type: ignore[arg-type]


def test_logit_margin_by_hand() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(50, 7), torch.randint(0, 7, (50,))
    got = logit_margin(logits, y)
    for i in range(50):
        others = [float(logits[i, j]) for j in range(7) if j != int(y[i])]
        assert float(got[i]) == pytest.approx(float(logits[i, y[i]]) - max(others))
    assert bool(((got > 0) == (logits.argmax(1) == y)).all())


def test_normalised_margin_is_scale_free_for_a_homogeneous_net() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    before = logit_margin(net(x), y) / weight_norm_product(net)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # logits scale by 3^2, and so does the product of the two norms
    after = logit_margin(net(x), y) / weight_norm_product(net)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-7)
    assert weight_norm_product(net) == pytest.approx(
        math.prod(float(m.weight.detach().norm()) for m in net if isinstance(m, nn.Linear))
    )


def test_training_run_on_the_log_grid(tmp_path) -> None:
    """A run tracked on the log grid records its tracked epochs' steps and output margins, and draws its
    curves on a log step axis."""
    text = tiny_train_toml(epochs=12, n_train=128) + 'every = "log"\nper_decade = 4\n'
    run = run_experiment(load_config(write_text(tmp_path / "c.toml", text)), tmp_path / "run")
    records = read_metrics(run)
    tracked = [r for r in records if "train" in r]
    assert len(records) == 13 and [r["epoch"] for r in tracked] == [0, 1, 2, 3, 5, 8, 12]
    assert [r["step"] for r in tracked] == [0, 4, 8, 12, 20, 32, 48]  # grid 3.2, 5.6, 10, 18, 32
    for r in tracked:
        for split in ("train", "test"):
            lm, nm = r[split]["logit_margin"], r[split]["normalised_margin"]
            assert lm["min"] <= lm["mean"] <= lm["max"] and (lm["mean"] > 0) == (nm["mean"] > 0)
    assert (run / "figures" / "margins.png").stat().st_size > 0


def test_tracking_never_changes_training(tmp_path) -> None:
    """What is tracked, and when, leaves the trained weights bit for bit the same: a run tracked every
    epoch with a random estimator and a bound, one tracked on a sparse log grid, and one on a denser grid
    end with equal weights (dropout makes training draw from the global RNG that estimators also use)."""
    small_cnn = 'name = "cnn"\noptions = { channels = [4], fc = [16], pool_every = 1, dropout = 0.3 }'
    mlp = 'name = "mlp"\noptions = { widths = [16] }'
    base = tiny_train_toml(epochs=6, n_train=96).replace(mlp, small_cnn)
    assert "dropout" in base
    variants = {
        "every": (
            'estimators = ["first-order", "sampling"]\n'
            "params = { sampling = { n_batches = 2, n_samples = 16 } }\n"
            'bound = "ddn"\nbound_every = 1\nbound_n = 8\n'
        ),
        "sparse": 'every = "log"\nper_decade = 1\n',
        "dense": 'every = "log"\nper_decade = 2\n',
    }
    weights, tracked = {}, {}
    for name, extra in variants.items():
        text = base.replace('estimators = ["first-order"]\n', "") + extra
        run = run_experiment(load_config(write_text(tmp_path / f"{name}.toml", text)), tmp_path / name)
        weights[name] = torch.load(run / WEIGHTS, weights_only=True)
        tracked[name] = sum("train" in r for r in read_metrics(run))
    assert tracked == {"every": 7, "dense": 5, "sparse": 4}  # the schedules really differ
    for name in ("sparse", "dense"):
        assert weights[name].keys() == weights["every"].keys()
        assert all(torch.equal(weights[name][k], weights["every"][k]) for k in weights["every"])
