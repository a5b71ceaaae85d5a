"""marginlab.core.stats and marginlab.core.predict against independent references: numpy's quantiles,
hand computations, scipy's t interval and a plain loop over batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from marginlab.core.predict import predict_labels, predict_logits
from marginlab.core.stats import (
    QUANTILE_KEYS,
    QUANTILES,
    ci_over_seeds,
    margin_stats,
    paired_ci,
    paired_difference,
)


# -- margin statistics ---------------------------------------------------------------------------------
def test_margin_stats_by_hand() -> None:
    m = torch.tensor([3.0, -1.0, 2.0, 0.0, 1.0])  # sorted: -1 0 1 2 3; rank h = q (N - 1) = 4 q
    st = margin_stats(m)
    assert list(st) == ["min", "mean", "median", "q10", "q25", "q75", "q90", "max", "neg_share"]
    expected = {"min": -1.0, "mean": 1.0, "median": 1.0, "q10": -0.6, "q25": 0.0, "q75": 2.0}
    expected |= {"q90": 2.6, "max": 3.0, "neg_share": 0.2}  # q10: h = 0.4, -1 + 0.4; q90: h = 3.6
    assert st == pytest.approx(expected, abs=1e-12)
    gd = margin_stats(m.double(), form="gd")
    assert list(gd) == ["min", "mean", "max", "q10", "q25", "median", "q75", "q90"]
    assert gd == pytest.approx({k: v for k, v in expected.items() if k != "neg_share"}, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 10, 1001])
def test_margin_stats_match_numpy(n: int) -> None:
    m = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 3 + 0.5
    a = m.numpy()
    for form in ("tracking", "gd"):
        st = margin_stats(m, form=form)
        assert st["min"] == a.min() and st["max"] == a.max() and st["mean"] == pytest.approx(a.mean(), 1e-12)
        for key, q in (("q10", 0.1), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("q90", 0.9)):
            assert st[key] == pytest.approx(np.quantile(a, q), rel=1e-12, abs=1e-12)
    assert margin_stats(m)["neg_share"] == (a < 0).sum() / n
    assert dict(zip(QUANTILE_KEYS, QUANTILES, strict=True)) == {
        "q10": 0.1, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.9
    }  # fmt: skip


def test_infinite_margins_take_the_nearest_order_statistic() -> None:
    """Failed attacks (+inf) would make linear interpolation NaN: the tracking form takes the nearest
    order statistic (N = 13: ranks h = 12 q = 1.2, 3, 6, 9, 10.8, no ties), the gd form stays linear."""
    m = torch.arange(13, dtype=torch.float64)
    m[11:] = math.inf
    st = margin_stats(m)
    assert [st[k] for k in QUANTILE_KEYS] == [1.0, 3.0, 6.0, 9.0, math.inf]
    assert [st[k] for k in QUANTILE_KEYS] == [
        float(np.quantile(m.numpy(), q, method="nearest")) for q in QUANTILES
    ]
    assert st["max"] == math.inf and st["min"] == 0.0
    assert math.isnan(margin_stats(m, form="gd")["q90"])  # between 10 and inf


def test_forms_keep_their_precision() -> None:
    """The tracking form computes in float64, the gd form in the margins' own dtype."""
    m = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float32)
    assert margin_stats(m)["mean"] == pytest.approx((0.1 + 0.2 + 0.7) / 3, abs=1e-8)
    assert margin_stats(m)["mean"] == float(m.double().mean())
    assert margin_stats(m, form="gd")["mean"] == float(m.mean())
    with pytest.raises(ValueError, match="form"):
        margin_stats(m, form="other")  # type: ignore[arg-type]


# -- paired comparisons --------------------------------------------------------------------------------
def test_paired_difference_is_the_standard_error_of_the_per_point_change() -> None:
    rng = np.random.default_rng(0)
    before, after = rng.random(400) < 0.4, rng.random(400) < 0.5
    d = after.astype(float) - before.astype(float)  # -1, 0, +1 per point
    out = paired_difference(before, after)
    se = d.std() / math.sqrt(len(d))  # population std of the paired changes over sqrt(n)
    assert out["delta"] == pytest.approx(after.mean() - before.mean(), abs=1e-15)
    assert out["noise_2se"] == pytest.approx(2 * se, rel=1e-12)
    assert out["beyond_noise"] == (abs(d.mean()) > 2 * se)
    same = paired_difference(before, before)  # no discordant point: one point's worth of noise
    assert same == {"delta": 0.0, "noise_2se": 2 / 400, "beyond_noise": False}


@pytest.mark.parametrize("level", [0.95, 0.9])
def test_paired_ci_is_scipys_t_interval(level: float) -> None:
    before = [1.0, 1.2, None, 0.9, 1.4]
    after = [1.5, 1.1, 2.0, 1.6, 1.9]  # the pair with a missing value is dropped
    d = np.array([0.5, -0.1, 0.7, 0.5])
    lo, hi = scipy_stats.t.interval(level, len(d) - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    out = paired_ci(before, after, level)
    assert out["seeds"] == 4 and out["diff"] == pytest.approx(d.mean(), abs=1e-15)
    assert out["ci"] == pytest.approx([lo, hi], rel=1e-12)
    assert out["beyond_noise"] == (lo > 0 or hi < 0)
    straddles = paired_ci([1.0, 1.2, 0.9], [1.1, 1.0, 1.0], level)
    assert straddles["ci"][0] < 0 < straddles["ci"][1] and not straddles["beyond_noise"]


def test_paired_ci_without_an_interval() -> None:
    assert paired_ci([1.0], [2.5]) == {"diff": 1.5, "ci": None, "seeds": 1, "beyond_noise": False}
    assert paired_ci([None], [2.5]) == {"diff": None, "ci": None, "seeds": 0, "beyond_noise": False}


def test_ci_over_seeds_in_words() -> None:
    assert ci_over_seeds({"ci": [-0.0123, 0.25]}, "+.1%") == "paired 95% CI of the difference [-1.2%, +25.0%]"
    assert ci_over_seeds({"ci": [0.123456, 1.5]}, ".3g") == "paired 95% CI of the difference [0.123, 1.5]"
    assert ci_over_seeds({"ci": None, "seeds": 1}, ".3g") == ""


# -- batched prediction --------------------------------------------------------------------------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)
    )


def test_predict_runs_batch_by_batch_without_gradients() -> None:
    model, x = _model(), torch.randn(23, 3, 2, 2)
    calls: list[int] = []
    model.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    logits = predict_logits(model, x, 10)
    assert calls == [10, 10, 3] and logits.shape == (23, 5) and not logits.requires_grad
    with torch.no_grad():
        by_hand = torch.cat([model(x[i : i + 10]) for i in range(0, 23, 10)])
    assert torch.equal(logits, by_hand)
    labels = predict_labels(model, x, 10, device=torch.device("cpu"))
    assert labels.dtype == torch.int64 and torch.equal(labels, by_hand.argmax(1))
    assert model.training  # the caller chooses the mode


def test_predict_moves_batches_to_the_device() -> None:
    seen: list[torch.device] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.device)
            return x.flatten(1)

    x = torch.randn(5, 2)
    out = predict_logits(Probe(), x, 2, device=torch.device("meta"))
    assert seen == [torch.device("meta")] * 3 and out.device.type == "meta" and out.shape == (5, 2)
