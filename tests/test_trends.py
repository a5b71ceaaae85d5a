"""Trends from the interpolation epoch: the regime where the min/mean trade-off is claimed."""

from __future__ import annotations

from marginlab.training.trends import margin_trends


def _rec(epoch: int, acc: float, lo: float, mean: float) -> dict:
    m = {"first-order": {"kind": "estimate", "min": lo, "mean": mean}}
    return {"epoch": epoch, "train": {"acc": acc, "margins": m}, "test": {"acc": acc, "margins": m}}


def test_trends_after_interpolation() -> None:
    # the mean rises while the model learns, then falls once the training subset is fit (epoch 3)
    records = [
        _rec(0, 0.1, -2, -1),
        _rec(1, 0.6, -1, 0.2),
        _rec(2, 0.9, -0.5, 0.8),
        _rec(3, 0.995, -0.1, 1.0),
    ]
    records += [_rec(4, 1.0, 0.1, 0.9), _rec(5, 1.0, 0.2, 0.85)]
    t = margin_trends(records, None, ["first-order"])
    train = t["margins"]["first-order"]["train"]
    assert train["interpolation"] == {"epoch": 3, "min": -0.1, "mean": 1.0}
    assert train["min_margin_rises_after_interpolation"] and train["mean_margin_falls_after_interpolation"]
    assert not train["mean_margin_falls"]  # from epoch 1 the mean rose: the baseline matters
    assert "after interpolation (epoch 3) the min margin rises" in t["findings"][0]
    assert "the mean falls (1 -> 0.85)" in t["findings"][0]


def test_never_interpolated_is_said() -> None:
    records = [_rec(0, 0.1, -2, -1), _rec(1, 0.5, -1, 0.2), _rec(2, 0.7, -0.5, 0.1)]
    t = margin_trends(records, None, ["first-order"])
    assert t["margins"]["first-order"]["train"]["interpolation"] is None
    assert "never fit" in t["findings"][0]


def test_null_statistics_read_back_keep_min_and_mean_aligned() -> None:
    # A resumed run reads its records back from metrics.jsonl, where a non-finite mean is null. The epoch
    # with a null mean must drop out of both series: the min of epoch 3 is never paired with another mean.
    records = [
        _rec(0, 0.1, -2, -1),
        _rec(1, 0.6, -1, 0.5),
        _rec(2, 0.9, -0.5, None),  # type: ignore[arg-type]
        _rec(3, 1.0, 0.3, 0.4),
        _rec(4, 1.0, 0.35, 0.3),
    ]
    train = margin_trends(records, None, ["first-order"])["margins"]["first-order"]["train"]
    assert train["first"] == {"epoch": 1, "min": -1, "mean": 0.5}
    assert train["last"] == {"epoch": 4, "min": 0.35, "mean": 0.3}
    assert train["peak_mean"] == {"epoch": 1, "mean": 0.5}
    assert train["interpolation"] == {"epoch": 3, "min": 0.3, "mean": 0.4}
    assert train["min_margin_rises_after_interpolation"] and train["mean_margin_falls_after_interpolation"]
