"""A bound tracked beside the estimate: measured at the right epochs on the first ``bound_n`` points of
each subset, with its kind, and equal to the same estimator run on those points by hand."""

from __future__ import annotations

import pytest
import torch

from conftest import margin_values
from marginlab.base.errors import ConfigError
from marginlab.core.stats import margin_stats
from marginlab.nets.models import build_model
from marginlab.training.tracking import MarginTracker, TrackingConfig


def test_bound_schedule_and_values() -> None:
    cfg = TrackingConfig(n_train=40, n_test=30, bound="deepfool", bound_n=12, bound_every=3)
    assert [e for e in range(11) if cfg.bounds(e, 10)] == [0, 1, 3, 6, 9, 10]
    torch.manual_seed(0)
    x, y = torch.rand(100, 1, 8, 8), torch.randint(0, 3, (100,))
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=3, widths=(16,))
    tracker = MarginTracker(cfg, {"train": (x, y), "test": (x, y)}, seed=0, device=torch.device("cpu"))
    meas = tracker.measure(model, 3, bound=True)
    rec = meas.record
    assert meas.bound_s > 0
    for split, (_, xs, ys) in tracker.subsets.items():
        got = rec[split]["margins"]["deepfool"]
        assert got["kind"] == "upper bound" and got["n"] == 12
        by_hand = margin_stats(margin_values(model, xs[:12], ys[:12], ["deepfool"])["deepfool"])
        assert got["min"] == pytest.approx(by_hand["min"]) and got["mean"] == pytest.approx(by_hand["mean"])
    unbounded = tracker.measure(model, 4)
    assert "deepfool" not in unbounded.record["train"]["margins"] and unbounded.bound_s == 0


def test_training_records_the_bound_time(tmp_path) -> None:
    """The records' ``time`` says how long the bound took, on exactly the bounded epochs."""
    from conftest import tiny_train_toml, write_text
    from marginlab.base.config import load_config
    from marginlab.base.fsio import read_jsonl
    from marginlab.experiments import run_experiment

    text = tiny_train_toml(epochs=4) + 'bound = "deepfool"\nbound_every = 3\nbound_n = 10\n'
    run = run_experiment(load_config(write_text(tmp_path / "c.toml", text)), tmp_path / "run")
    times = {r["epoch"]: r["time"] for r in read_jsonl(run / "metrics.jsonl")}
    assert sorted(e for e, t in times.items() if "bound_s" in t) == [0, 1, 3, 4]
    assert all(0 < t["bound_s"] <= t["track_s"] for t in times.values() if "bound_s" in t)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"bound": "first-order"}, "not a bound"),
        ({"bound": "first-order", "estimators": ("ddn",)}, "not a bound"),
        ({"bound": "ddn", "estimators": ("ddn",)}, "already an estimator"),
        ({"bound": "ddn", "p": "inf"}, "does not support"),
        ({"bound": "ddn", "bound_n": 0}, "bound_n"),
        ({"bound": "ddn", "bound_params": {"steps": -1}}, "steps"),
    ],
)
def test_bad_bound_settings(kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        TrackingConfig(**kw)
