"""The ``compare`` experiment end to end on tiny digits configs: sub-runs, tables, figures, summary,
resume, and its config errors."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from marginlab.base.config import load_config, merge_overrides
from marginlab.base.errors import ConfigError, MarginlabError
from marginlab.base.fsio import read_json
from marginlab.core.stats import paired_difference
from marginlab.experiments import build_config, resume_experiment, run_experiment
from marginlab.experiments.compare_config import BaseConfig, RobustnessConfig, subrun_config
from marginlab.experiments.compare_verdicts import _finding, _versus
from marginlab.lab.runs import read_config, read_summary, subrun_dir
from marginlab.robustness.evaluate import margin_upper_from_points

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TRAIN = {
    "kind": "train",
    "seed": 0,
    "data": {"dataset": "digits", "n_train": 400},
    "model": {"name": "mlp", "options": {"widths": [16]}},
    "train": {"epochs": 2, "batch_size": 50, "lr": 0.1, "device": "cpu", "progress": False, "threads": 1},
    "tracking": {"estimators": ["first-order"], "n_train": 60, "n_test": 60},
    "regularizer": {"gamma": 2.0, "beta": 1e-3},  # no reference gamma for a digits MLP
}
COMPARE = {
    "kind": "compare",
    "recipes": ["standard", "regularized"],
    "seeds": [0],
    "bases": [{"name": "digits-mlp", "config": TRAIN, "eps": 1.0}],
    "robustness": {
        "n": 40, "steps": 10, "step_size_rel": 0.25, "sweep": [0.5, 1.0], "bound": "deepfool",
        "attacks": ["pgd", "autoattack"],
        "aa_version": "custom", "aa_attacks": ["apgd-ce"], "aa_iters": 5, "autoattack_at": "reference",
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return run_experiment(copy.deepcopy(COMPARE), tmp_path_factory.mktemp("compare") / "run")


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_files_and_subruns(run_dir):
    for name in ("config.json", "summary.json", "table.csv", "table.md", "sweep.csv"):
        assert (run_dir / name).is_file(), name
    for fig in ("margin_curves.png", "histograms.png", "robustness.png"):
        assert (run_dir / "figures" / fig).stat().st_size > 5000, fig
    for recipe in ("standard", "regularized"):
        sub = subrun_dir(run_dir, "digits-mlp", recipe, 0)
        assert {"model.pt", "summary.json", "robustness.json", "metrics.jsonl"} <= {
            p.name for p in sub.iterdir()
        }
        cfg = read_config(sub)
        assert cfg["kind"] == "train" and cfg["regularizer"]["recipe"] == recipe and cfg["seed"] == 0
        # the shared gamma/beta reach only the recipe that has those terms
        reg = cfg["regularizer"]
        assert (reg["gamma"], reg["beta"]) == ((2.0, 1e-3) if recipe == "regularized" else (None, None))


def test_table_matches_the_subrun_files(run_dir):
    """Every table cell is recomputed here from the sub-runs' own files (numpy on per-point data)."""
    rows = {r["recipe"]: r for r in _csv(run_dir / "table.csv")}
    assert set(rows) == {"standard", "regularized"}
    for recipe, row in rows.items():
        sub = subrun_dir(run_dir, "digits-mlp", recipe, 0)
        s, rob = read_summary(sub), read_json(sub / "robustness.json")
        assert float(row["clean_acc"]) == pytest.approx(s["clean_accuracy"]["test"])
        last = s["margins"]["first-order"]["test"]["last"]
        assert float(row["test_mean_margin"]) == pytest.approx(last["mean"])
        assert float(row["test_min_margin"]) == pytest.approx(last["min"])
        correct = np.asarray(rob["points"]["correct"])
        upper = margin_upper_from_points(rob["points"])
        robust = np.asarray(rob["points"]["robust"])
        assert rob["eps"] == [0.5, 1.0] and float(row["eps_ref"]) == 1.0
        assert float(row["bound@ref"]) == pytest.approx(np.mean(correct & (upper > 1.0)))
        assert float(row["worst@ref"]) == pytest.approx(robust[1].mean())
        assert float(row["worst@ref"]) <= min(float(row["pgd@ref"]), float(row["bound@ref"])) + 1e-12
        assert row["sweep_eps"] == "0.5;1"
        worst = [float(v) for v in row["sweep_worst"].split(";")]
        assert worst[0] >= worst[1]  # robust accuracy never rises with eps
    tidy = _csv(run_dir / "sweep.csv")
    assert len(tidy) == 4 and {r["autoattack"] for r in tidy if r["eps"] == "0.5"} == {
        ""
    }  # AA at eps_ref only
    md = (run_dir / "table.md").read_text()
    assert "10 steps of 0.25 x eps_ref" in md and "reference: 1000 steps of 0.01" in md


def test_summary_states_the_verdict_either_way(run_dir):
    s = read_summary(run_dir)
    base = s["bases"]["digits-mlp"]
    v = base["vs_standard"]["regularized"]
    rows = {r["recipe"]: r for r in _csv(run_dir / "table.csv")}
    higher = float(rows["regularized"]["test_mean_margin"]) > float(rows["standard"]["test_mean_margin"])
    assert v["mean_margin"]["higher"] == higher
    assert base["regularized_beats_standard"]["mean_margin"] == (higher and v["comparable"])
    ref = next(r for r in v["robust_accuracy"] if r["reference"])
    delta = float(rows["regularized"]["worst@ref"]) - float(rows["standard"]["worst@ref"])
    assert ref["eps"] == 1.0 and ref["delta"] == pytest.approx(delta)  # paired = unpaired on the mean
    beats = v["comparable"] and delta > 0 and ref["beyond_noise"]
    assert base["regularized_beats_standard"]["robust_accuracy"] == beats
    assert all(f.startswith("digits-mlp: ") for f in s["findings"])
    # the verdict sentences (certified accuracy, the fixed points' margins, cost and ranking follow)
    words = ("test mean margin", "worst-case robust", "did NOT train")
    findings = [f for f in s["findings"] if f.startswith("digits-mlp: regularized ")]
    findings = [f for f in findings if any(w in f for w in words)]
    if v["comparable"]:  # one sentence on the margin, one on robust accuracy
        margin, robust = findings
        assert ("does NOT raise" in margin) == (not higher) and "one seed: no interval" in margin
        assert ("does NOT improve" in robust) == (delta <= 0) and "worst-case robust accuracy" in robust
    else:
        assert len(findings) == 1 and "did NOT train as well" in findings[0]


def test_paired_difference_closed_form():
    before = np.array([1, 1, 0, 0, 1], dtype=bool)
    after = np.array([1, 0, 1, 1, 1], dtype=bool)  # one point lost, two gained
    d = paired_difference(before, after)
    assert d["delta"] == pytest.approx(1 / 5)
    assert d["noise_2se"] == pytest.approx(2 * np.sqrt(3 - 1 / 5) / 5)
    same = paired_difference(before, before)
    assert same["delta"] == 0 and not same["beyond_noise"] and same["noise_2se"] == pytest.approx(2 / 5)


def test_an_untrained_recipe_is_not_counted_as_a_win():
    """A model stuck at chance predicts one class everywhere and looks 'robust' on it: no verdict."""
    flags = np.zeros((1, 100), dtype=bool)
    common = {"eps": [1.0], "eps_ref": 1.0, "test_mean_margin": 1.0}
    std = {**common, "recipe": "standard", "clean_acc": 0.9, "worst@1": 0.05, "_robust": flags}
    stuck = {**common, "recipe": "regularized", "clean_acc": 0.11, "worst@1": 0.11, "test_mean_margin": 2.0}
    stuck["_robust"] = np.arange(100)[None] < 11
    v = _versus(std, stuck)
    assert not v["comparable"] and v["robust_accuracy"][0]["beyond_noise"]
    assert v["beats_standard"] == dict.fromkeys(
        ["mean_margin", "mean_margin_beyond_noise", "robust_accuracy", "robust_accuracy_any_eps"], False
    )
    assert "did NOT train as well" in _finding("b", "regularized", v, "first-order")[0]


def test_robust_accuracy_over_seeds_needs_an_interval_that_excludes_zero():
    """Three seeds: +10 points over 300 pooled test points is beyond the point noise, but when the
    seeds disagree (+30, 0, 0 points) the paired interval over seeds straddles 0 and no win is claimed."""
    robust = np.zeros((1, 300), dtype=bool)
    better = robust.copy()
    better[0, :30] = True  # 30 more points in seed 0 only
    common = {"eps": [1.0], "eps_ref": 1.0, "clean_acc": 0.9}
    std = common | {
        "recipe": "standard",
        "test_mean_margin": 1.0,
        "worst@1": 0.0,
        "_robust": robust,
        "_per_seed_worst": [[0.0, 0.0, 0.0]],
        "_per_seed_mean_margin": [1.0, 1.1, 0.9],
    }
    reg = common | {
        "recipe": "regularized",
        "test_mean_margin": 1.2,
        "worst@1": 0.1,
        "_robust": better,
        "_per_seed_worst": [[0.3, 0.0, 0.0]],
        "_per_seed_mean_margin": [1.2, 1.3, 1.1],
    }
    v = _versus(std, reg)
    ref = v["robust_accuracy"][0]
    assert ref["beyond_noise"] and ref["over_seeds"]["seeds"] == 3 and not ref["over_seeds"]["beyond_noise"]
    assert v["beats_standard"]["robust_accuracy"] is False
    assert v["beats_standard"]["mean_margin_beyond_noise"] is True  # +0.2 on every seed
    margin, robust_text = _finding("b", "regularized", v, "first-order")
    assert "beyond noise over 3 seeds" in margin and "within noise over 3 seeds" in robust_text
    reg["_per_seed_worst"] = [[0.1, 0.1, 0.1]]  # the same gain on every seed: beyond noise both ways
    assert _versus(std, reg)["beats_standard"]["robust_accuracy"] is True


def test_resume_skips_finished_subruns_and_redoes_missing_work(run_dir):
    std = subrun_dir(run_dir, "digits-mlp", "standard", 0)
    reg = subrun_dir(run_dir, "digits-mlp", "regularized", 0)
    weights = {p: (p / "model.pt").stat().st_mtime_ns for p in (std, reg)}
    old_rob = read_json(reg / "robustness.json")
    old_summary = read_summary(std)
    (run_dir / "summary.json").unlink()  # as if the comparison had been killed...
    (reg / "robustness.json").unlink()  # ...before evaluating the second model
    (std / "summary.json").unlink()  # and a sub-run whose summary was never written: resumed, not retrained
    metrics = (std / "metrics.jsonl").read_text()
    resume_experiment(run_dir)
    assert {p: (p / "model.pt").stat().st_mtime_ns for p in (std, reg)}[reg] == weights[reg]
    assert (std / "metrics.jsonl").read_text() == metrics  # nothing retrained
    assert read_summary(std)["clean_accuracy"] == old_summary["clean_accuracy"]
    new_rob = read_json(reg / "robustness.json")  # seeded attacks: the same numbers again
    assert new_rob["worst_case"] == old_rob["worst_case"] and new_rob["points"] == old_rob["points"]
    assert read_summary(run_dir)["bases"]["digits-mlp"]["regularized_beats_standard"] is not None


def test_parallel_subruns_give_the_same_results(run_dir, tmp_path):
    """``jobs = 2``: the sub-runs train in two worker processes (one thread each, as in this process) and
    every file they write says what the in-process comparison's files say."""
    cfg = copy.deepcopy(COMPARE) | {"jobs": 2}
    par = run_experiment(cfg, tmp_path / "par")
    for recipe in COMPARE["recipes"]:
        ours, theirs = subrun_dir(par, "digits-mlp", recipe, 0), subrun_dir(run_dir, "digits-mlp", recipe, 0)
        assert _records(ours) == _records(theirs), recipe
        rob = [read_json(run / "robustness.json")["points"] for run in (ours, theirs)]
        assert rob[0] == rob[1], recipe
    assert (par / "table.csv").read_text() == (run_dir / "table.csv").read_text()


def _records(run: Path) -> list[dict]:
    """The metric records of a run without their timings."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def test_a_failed_parallel_subrun_is_one_error_and_keeps_the_others(tmp_path):
    bad = copy.deepcopy(TRAIN)
    bad["train"]["lr"] = 1e6  # diverges in its first epoch
    cfg = copy.deepcopy(COMPARE) | {"jobs": 2, "recipes": ["standard"]}
    cfg["bases"] = [{"name": "broken", "config": bad, "eps": 1.0}, cfg["bases"][0]]
    failed = r"sub-run .*broken.standard-seed0 failed: training (diverged|collapsed)"
    with pytest.raises(MarginlabError, match=failed):
        run_experiment(cfg, tmp_path / "run")
    assert (subrun_dir(tmp_path / "run", "digits-mlp", "standard", 0) / "robustness.json").is_file()


def test_parallel_subruns_log_lines_tagged_with_their_run(tmp_path):
    """With jobs = 2 on the command line, each worker logs its epochs as lines naming its sub-run."""
    import subprocess
    import sys

    from conftest import tiny_train_toml, write_text

    write_text(tmp_path / "base.toml", tiny_train_toml(epochs=2) + "[regularizer]\nbeta = 1e-3\n")
    config = write_text(
        tmp_path / "cmp.toml",
        'kind = "compare"\nrecipes = ["standard", "constraint"]\njobs = 2\n'
        '[[bases]]\nname = "tiny"\npreset = "base.toml"\neps = 1.0\n'
        '[robustness]\nn = 20\nbound = "none"\nattacks = ["pgd"]\nsteps = 5\nsweep = [1.0]\n',
    )
    proc = subprocess.run(
        [sys.executable, "-m", "marginlab", "run", str(config), "--out", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for recipe in ("standard", "constraint"):
        assert f"INFO [tiny/{recipe}-seed0] marginlab.training.loop: epoch 2/2" in proc.stderr, proc.stderr


def test_attacks_use_the_subrun_thread_count(monkeypatch, tmp_path):
    import torch

    import marginlab.experiments.compare as compare

    seen = []
    monkeypatch.setattr("marginlab.experiments.compare.run_or_resume", lambda raw, path: "skip")
    monkeypatch.setattr(compare, "evaluate_subrun", lambda *a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    sub = compare.SubRun({"b": BaseConfig(name="b", config=TRAIN, eps=1.0)}, RobustnessConfig())
    sub({"train": {"threads": before + 1}}, tmp_path / "b" / "standard-seed0", "")
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_resolved_base_configs_are_embedded(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('kind = "train"\n[model]\nname = "mnist-mlp"\n[train]\nepochs = 7\n')
    raw = {
        "kind": "compare",
        "bases": [{"name": "b", "preset": str(preset), "overrides": {"train.epochs": 3}}],
    }
    _, cfg = build_config(raw)
    assert cfg.bases[0].config["train"]["epochs"] == 3 and cfg.bases[0].reference_eps == 1.0
    from marginlab.base.config import to_dict

    saved = {"kind": "compare", **to_dict(cfg)}
    preset.write_text('kind = "train"\n[train]\nepochs = 99\n')  # the preset changes afterwards...
    _, again = build_config(json.loads(json.dumps(saved)))
    assert again.bases[0].config["train"]["epochs"] == 3  # ...the saved run does not


def test_merge_overrides():
    base = {"train": {"epochs": 5, "lr": None}, "model": {"name": "x"}}
    out = merge_overrides(base, {"train.epochs": 2, "model": {"options": {"widths": [8]}}, "seed": 3})
    assert out == {
        "train": {"epochs": 2, "lr": None},
        "model": {"name": "x", "options": {"widths": [8]}},
        "seed": 3,
    }
    assert base["train"]["epochs"] == 5
    with pytest.raises(ConfigError, match="not a section"):
        merge_overrides(base, {"model.name.x": 1})


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"recipes": ["standard", "fancy"]}, "unknown recipe"),
        ({"seeds": [0, 0]}, "distinct"),
        ({"bases": []}, "at least one"),
        ({"bases": [{"name": "a/b", "config": TRAIN, "eps": 1.0}]}, "directory name"),
        ({"bases": [{"name": "x"}]}, "preset"),
        ({"bases": [{"name": "x", "preset": "no-such-preset"}]}, "not found"),
        ({"bases": [{"name": "x", "config": TRAIN}]}, "reference eps"),
        ({"bases": [{"name": "x", "config": {**TRAIN, "regularizer": {}}, "eps": 1.0}]}, "gamma"),
        ({"bases": [{"name": "x", "config": {**TRAIN, "regularizer": {"gama": 1}}, "eps": 1.0}]}, "gama"),
        ({"bases": [{"name": "x", "config": {**TRAIN, "kind": "logreg-gd"}, "eps": 1.0}]}, "kind"),
        ({"robustness": {"attacks": ["pgd", "cw"]}}, "attack"),
        ({"robustness": {"surprise": 1}}, "surprise"),
        ({"robustness": {"bound": "first-order"}}, "minimum-norm"),
        ({"robustness": {"norm": "Linf", "bound": "ddn"}}, "Linf"),
    ],
)
def test_config_errors(change, words):
    raw = {**copy.deepcopy(COMPARE), **copy.deepcopy(change)}
    with pytest.raises(ConfigError, match=words):
        build_config(raw)


def test_presets_load():
    bases = {"mnist-lr": 1.0, "mnist-mlp": 1.0, "mnist-cnn": 2.0, "fashion-cnn": 2.0}  # reference eps
    presets = [("compare-quick", ["mnist-mlp", "mnist-cnn"]), ("compare-medium", ["mnist-mlp"])]
    for name, names in (*presets, ("compare-full", list(bases))):
        _, cfg = build_config(load_config(CONFIGS / f"{name}.toml"))
        assert [b.name for b in cfg.bases] == names
        assert [b.reference_eps for b in cfg.bases] == [bases[n] for n in names]
        for base in cfg.bases:
            for recipe in cfg.recipes:
                build_config(subrun_config(base, recipe, 0))
    assert build_config(load_config(CONFIGS / "compare-medium.toml"))[1].seeds == (0, 1, 2)
    for name in ("mnist-lr-quick", "mnist-lr-medium", "mnist-lr-full"):
        kind, cfg = build_config(load_config(CONFIGS / f"{name}.toml"))
        assert kind == "train" and cfg.model.name == "mnist-lr"
    assert BaseConfig(name="x", preset="mnist-lr-quick").model_name == "mnist-lr"


def test_paired_ci_over_seeds_closed_form():
    from scipy import stats

    from marginlab.core.stats import paired_ci

    before, after = [1.0, 1.2, 0.9], [1.5, 1.6, 1.6]
    d = np.array(after) - np.array(before)  # 0.5, 0.4, 0.7
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    out = paired_ci(before, after)
    assert out["diff"] == pytest.approx(d.mean()) and out["seeds"] == 3
    assert out["ci"] == pytest.approx([d.mean() - half, d.mean() + half]) and out["beyond_noise"]
    assert not paired_ci([1.0, 1.2, 0.9], [1.1, 1.0, 1.0])["beyond_noise"]  # differences straddle 0
    one = paired_ci([1.0], [2.0])
    assert one["ci"] is None and not one["beyond_noise"] and one["diff"] == 1.0
