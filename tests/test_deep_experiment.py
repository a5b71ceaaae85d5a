"""The ``train`` experiment end to end on tiny data: files, summary, figures, presets, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from marginlab.base.config import load_config
from marginlab.base.errors import ConfigError, DataError
from marginlab.base.fsio import read_jsonl
from marginlab.core.stats import QUANTILES
from marginlab.experiments import build_config, plot_run, run_experiment
from marginlab.lab.runs import read_summary
from marginlab.training.tracking import load_points

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = {
    "kind": "train",
    "seed": 1,
    "data": {"dataset": "digits", "n_train": 600},
    "model": {"name": "lr", "options": {}},
    "train": {"epochs": 4, "batch_size": 50, "lr": 0.05, "device": "cpu", "progress": False, "threads": 1},
    "tracking": {"estimators": ["first-order", "exact-linear"], "n_train": 100, "n_test": "all",
                 "save_margins_every": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A linear model (so an exact margin exists) trained with both estimators tracked."""
    return run_experiment(json.loads(json.dumps(TINY)), tmp_path_factory.mktemp("deep") / "run")


def test_run_directory_files(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "model.pt", "margins"} <= names
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    assert "train_loss_epoch" not in records[0] and all("train_loss_epoch" in r for r in records[1:])
    # per-point margins at epochs 0, 1, the last, and every 2nd
    assert sorted(load_points(run_dir)) == [0, 1, 2, 4]
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    assert set(weights) == {"head.weight", "head.bias"}


def test_recorded_statistics_match_the_saved_points(run_dir):
    """The JSON statistics are recomputed independently from the per-point arrays (numpy)."""
    records = {r["epoch"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
    for epoch, splits in load_points(run_dir).items():
        for split, arrays in splits.items():
            rec = records[epoch][split]
            assert rec["n"] == len(arrays["y"]) == len(arrays["index"])
            assert rec["acc"] == pytest.approx(arrays["correct"].mean())
            for name in ("first-order", "exact-linear"):
                a = arrays[name].astype(np.float64)
                st = rec["margins"][name]
                assert st["min"] == pytest.approx(a.min(), rel=1e-6) and st["mean"] == pytest.approx(
                    a.mean(), 1e-5
                )
                for q, key in zip(QUANTILES, ("q10", "q25", "median", "q75", "q90"), strict=True):
                    assert st[key] == pytest.approx(np.quantile(a, q), rel=1e-5, abs=1e-6)
                # misclassified points (and only they) have negative margins
                assert np.array_equal(a < 0, ~arrays["correct"])
    assert records[4]["test"]["n"] == 450  # n_test = "all": the whole digits test split


def test_first_order_is_exact_on_a_linear_model(run_dir):
    for splits in load_points(run_dir).values():
        for arrays in splits.values():
            np.testing.assert_allclose(arrays["first-order"], arrays["exact-linear"], rtol=1e-4, atol=1e-6)


def test_summary_states_trends_honestly(run_dir):
    s = read_summary(run_dir)
    assert s["kind"] == "train" and s["model"] == "lr" and s["lr"] == 0.05 and s["n_train"] == 600
    assert 0.5 < s["clean_accuracy"]["test"] <= 1.0
    records = read_jsonl(run_dir / "metrics.jsonl")
    m_names = ("first-order", "exact-linear")
    for name in m_names:
        m = s["margins"][name]
        assert m["kind"] == ("estimate" if name == "first-order" else "exact")
        for split in ("train", "test"):
            t = m[split]
            first, last = records[1][split]["margins"][name], records[4][split]["margins"][name]
            assert t["first"]["epoch"] == 1 and t["last"]["epoch"] == 4
            assert t["min_margin_rises"] == (last["min"] > first["min"])
            assert t["mean_margin_falls"] == (last["mean"] < first["mean"])
            assert 0.0 <= t["share_closer"] <= 1.0
    assert len(s["findings"]) == 4
    for f, (name, split) in zip(
        s["findings"], [(n, sp) for n in m_names for sp in ("train", "test")], strict=True
    ):
        t = s["margins"][name][split]
        assert f.startswith(f"{name} ({s['margins'][name]['kind']}), {split}:")
        assert ("min margin rises" if t["min_margin_rises"] else "min margin does NOT rise") in f
        assert ("mean margin falls" if t["mean_margin_falls"] else "mean margin does NOT fall") in f


def test_figures_are_redrawn_from_files_alone(run_dir):
    for p in (run_dir / "figures").iterdir():
        p.unlink()
    paths = plot_run(run_dir)
    assert {p.name for p in paths} == {"margins.png", "histograms.png", "loss_accuracy.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


QUICK_RATES = {"mnist-mlp-quick": 0.1}


def test_long_cnn_preset_tracks_on_the_log_grid():
    """configs/mnist-cnn-long.toml: 20,000 reference-rate SGD steps on 500 images, tracked on log steps."""
    kind, cfg = build_config(load_config(CONFIGS / "mnist-cnn-long.toml"))
    assert kind == "train" and cfg.lr == 0.01 and cfg.train.momentum == 0.9 and cfg.train.nesterov
    steps_per_epoch = -(-cfg.data.n_train // cfg.train.batch_size)
    assert cfg.train.epochs * steps_per_epoch >= 20_000 and cfg.model.options == {"init": "kaiming"}
    last = cfg.train.epochs
    tracked = [e for e in range(last + 1) if cfg.tracking.tracks(e, last, steps_per_epoch)]
    assert cfg.tracking.every == "log" and len(tracked) < 60  # tracking stays cheap over 1,250 epochs


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*-quick.toml")) + sorted(CONFIGS.glob("*-medium.toml"))
                         + sorted(CONFIGS.glob("*-full.toml")), ids=lambda p: p.stem)  # fmt: skip
def test_presets_are_valid(path):
    if path.stem.split("-")[0] not in ("mnist", "fashion", "cifar"):
        pytest.skip("not a preset of this experiment")
    kind, cfg = build_config(load_config(path))
    assert (
        kind == "train" and cfg.train.batch_size == 128 and cfg.train.momentum == 0.9 and cfg.train.nesterov
    )
    if path.stem in QUICK_RATES:  # a quick preset that trains faster than the reference to fit its subset
        assert cfg.lr == QUICK_RATES[path.stem]
    else:
        assert cfg.lr in (0.01, 0.005)  # the reference rates (0.005: the reference's standard CIFAR-CNN)
    if path.stem in ("mnist-cnn-quick", "fashion-cnn-quick"):  # He init: no chance-level plateau
        assert cfg.model.options == {"init": "kaiming"}
    if path.stem.endswith(("full", "medium")):  # the reference length on the full training set
        reference_epochs = 1000 if cfg.model.name.endswith("-lr") else 200  # 1000 for linear models
        assert cfg.train.epochs == reference_epochs and cfg.data.n_train is None
    if path.stem.endswith("full"):
        assert cfg.tracking.n_test == "all"


@pytest.mark.parametrize(
    "change, error, match",
    [
        (("model", "name", "resnet"), ConfigError, "unknown model 'resnet'"),
        (("data", "dataset", "svhn"), DataError, "unknown dataset 'svhn'"),
        (("tracking", "estimators", ["first-order", "magic"]), ConfigError, "unknown estimator 'magic'"),
        (("tracking", "n_test", 0), ConfigError, "tracking.n_test must be > 0"),
        (("train", "epochs", -1), ConfigError, "train.epochs must be a finite number > 0"),
        (("regularizer", "recipe", "regularized"), ConfigError, "no reference gamma"),
        (("train", "lrate", 0.1), ConfigError, "unknown config key 'train.lrate'"),
        (("model", "options", {"input_shape": [1, 8, 8]}), ConfigError, "has no option 'input_shape'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_configs_fail_before_any_run_directory(tmp_path, change, error, match):
    raw = json.loads(json.dumps(TINY))
    section, key, value = change
    raw[section] = {**raw.get(section, {}), key: value}
    with pytest.raises(error, match=match) as e:
        run_experiment(raw, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
