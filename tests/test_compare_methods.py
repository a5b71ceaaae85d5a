"""The ``compare`` report of many training recipes, from fabricated run-directory files: the side-by-side
tables, the training cost relative to ``standard``, the ablation verdicts, the figures and the report.

Every sub-run file is written here the way the experiment writes it (``summary.json``, ``config.json``,
``metrics.jsonl`` with the epochs' times, ``robustness.json`` through :class:`RobustnessResult`), so the
expected numbers are computed independently with numpy / scipy from the same arrays."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from marginlab.base.config import load_config
from marginlab.base.fsio import atomic_write_json
from marginlab.experiments import build_config
from marginlab.experiments.compare_config import BaseConfig, RobustnessConfig
from marginlab.experiments.compare_pairs import cost_ratio
from marginlab.experiments.compare_results import collect
from marginlab.experiments.compare_tables import write_tables
from marginlab.experiments.compare_verdicts import _ranking, summarize
from marginlab.lab.names import subrun_dir
from marginlab.plots.compare import plot_compare
from marginlab.report import write_report
from marginlab.robustness import RobustnessResult
from marginlab.training.recipes import RECIPES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE_SCALE = {"standard": 1.0, "constraint": 1.6, "regularized": 2.2}  # margins grow down the list
COST = {"standard": (1.0, 1.0), "constraint": (1.2, 1.25), "regularized": (3.0, 3.3)}  # per-seed factor
STD_WALL = (5.0, 6.0)  # standard's wall seconds per epoch, seeds 0 and 1
TRACKED_MEAN = {"standard": (0.5, 0.55), "constraint": (1.0, 1.1), "regularized": (1.0, 1.12)}
SEEDS, EPS, N, EPOCHS = (0, 1), (0.5, 1.0), 101, 2
BASE = "digits-mlp"
TRAIN = {
    "kind": "train", "data": {"dataset": "digits"}, "model": {"name": "mlp", "options": {"widths": [8]}},
    "regularizer": {"gamma": 2.0},
}  # fmt: skip


def _margins(recipe: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Upper bounds and certified radii of the fixed points: the same draws for every recipe of a seed,
    scaled, so the recipes' robust sets are nested (a clean paired difference)."""
    grid = stats.norm.ppf((np.arange(N) + 0.5) / N)  # the same spread in every seed, points shuffled
    base = 0.9 + 0.6 * np.random.default_rng(seed).permutation(grid) + 0.003 * seed
    upper = np.where(base > 0, base * RECIPE_SCALE[recipe], base)
    return upper, np.where(upper > 0, 0.5 * upper, upper)


def _result(recipe: str, seed: int) -> RobustnessResult:
    upper, lower = _margins(recipe, seed)
    correct = upper > 0
    robust = [correct & (upper > e) for e in EPS]
    certified = [float(np.mean(correct & (lower >= e))) for e in EPS]
    worst = [float(r.mean()) for r in robust]
    return RobustnessResult(
        norm="L2", eps=list(EPS), stages=["bound", "autoattack"], n=N, clean_accuracy=float(correct.mean()),
        accuracy={"bound": worst, "autoattack": [None, worst[1]]}, worst_case=worst,
        bound={"estimator": "best"}, bound_share=worst, attacked={"autoattack": [0, N]},
        points={"label": [0] * N, "correct": correct.tolist(), "margin_upper": upper.tolist(),
                "robust": [r.tolist() for r in robust], "margin_lower": lower.tolist()},
        settings={"attacks": ["autoattack"], "norm": "L2"}, seconds={}, certified=certified,
        certifier={"estimator": "crown"},
    )  # fmt: skip


def _write_subrun(run_dir: Path, recipe: str, seed: int) -> None:
    sub = subrun_dir(run_dir, BASE, recipe, seed)
    sub.mkdir(parents=True)
    atomic_write_json(
        sub / "config.json", {**TRAIN, "seed": seed, "tracking": {"estimators": ["first-order"]}}
    )
    wall = STD_WALL[seed] * COST[recipe][seed]
    records = [
        {"epoch": e, "time": {"train_s": wall if e else 0.01, "track_s": 9.0, "train_cpu_s": 2 * wall}}
        for e in range(EPOCHS + 1)
    ]
    (sub / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mean = TRACKED_MEAN[recipe][seed]
    summary = {
        "epochs": EPOCHS, "lr": 0.1, "clean_accuracy": {"test": 0.9 - 0.01 * seed},
        "margins": {"first-order": {"test": {"last": {"min": -0.1, "mean": mean}}}},
    }  # fmt: skip
    atomic_write_json(sub / "summary.json", summary)
    _result(recipe, seed).save(sub / "robustness.json", reference_eps=1.0)


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory) -> tuple[Path, SimpleNamespace, dict]:
    """A finished comparison of 3 recipes x 2 seeds, written file by file; its config (duck-typed: the
    readers need only bases, recipes, seeds and robustness) and summary."""
    run_dir = tmp_path_factory.mktemp("methods") / "run"
    recipes = tuple(RECIPE_SCALE)
    for seed in SEEDS:
        for recipe in recipes:
            _write_subrun(run_dir, recipe, seed)
    base = BaseConfig(name=BASE, config=TRAIN, eps=1.0)
    rc = RobustnessConfig(n=N, sweep=(0.5,), bound="best", attacks=("autoattack",), certify="crown")
    cfg = SimpleNamespace(bases=(base,), recipes=recipes, seeds=SEEDS, robustness=rc)
    bases = [{"name": BASE, "config": TRAIN, "eps": 1.0}]
    atomic_write_json(
        run_dir / "config.json",
        {"kind": "compare", "bases": bases, "recipes": list(recipes), "seeds": list(SEEDS)},
    )
    rows = collect(cfg, run_dir)
    summary = summarize(cfg, run_dir, rows)
    write_tables(cfg, run_dir, rows, summary)
    atomic_write_json(run_dir / "summary.json", {"kind": "compare", **summary})
    return run_dir, cfg, summary


def _table(run_dir: Path) -> dict[str, dict[str, str]]:
    with open(run_dir / "table.csv") as f:
        return {r["recipe"]: r for r in csv.DictReader(f)}


def test_side_by_side_numbers_match_the_files(compare_run):
    run_dir, _, _ = compare_run
    rows = _table(run_dir)
    assert list(rows) == ["standard", "constraint", "regularized"]
    for recipe, row in rows.items():
        per_seed = [_margins(recipe, s) for s in SEEDS]
        uppers = [u for u, _ in per_seed]
        assert float(row["upper_median"]) == pytest.approx(np.mean([np.median(u) for u in uppers]))
        assert float(row["upper_min"]) == pytest.approx(np.mean([u.min() for u in uppers]))
        assert float(row["lower_mean"]) == pytest.approx(np.mean([lo.mean() for _, lo in per_seed]))
        worst = [np.mean((u > 0) & (u > 1.0)) for u in uppers]
        assert float(row["worst@ref"]) == pytest.approx(np.mean(worst))
        certified = [np.mean((lo > 0) & (lo >= 1.0)) for _, lo in per_seed]
        assert float(row["certified@ref"]) == pytest.approx(np.mean(certified))
        assert float(row["worst@ref"]) >= float(row["certified@ref"])  # the band
    md = (run_dir / "table.md").read_text()
    assert f"## {BASE}: recipes side by side" in md and f"## {BASE}: ablations" in md
    assert "bound median" in md and "certified q25" in md and "x standard" in md


def test_cost_ratio_is_the_geometric_mean_of_paired_ratios_with_a_t_interval(compare_run):
    _, _, summary = compare_run
    cost = summary["bases"][BASE]["vs_standard"]["regularized"]["time"]
    logs = np.log(COST["regularized"])  # the per-seed ratios 3.0 and 3.3
    half = stats.t.ppf(0.975, 1) * logs.std(ddof=1) / math.sqrt(2)
    for what in ("wall", "cpu"):  # CPU time is twice the wall time: the same ratios
        c = cost[what]
        assert c["ratio"] == pytest.approx(math.sqrt(3.0 * 3.3)) and c["seeds"] == 2
        assert c["ci"] == pytest.approx([math.exp(logs.mean() - half), math.exp(logs.mean() + half)])
        assert c["beyond_noise"] == (c["ci"][0] > 1 or c["ci"][1] < 1)
    assert any("regularized trains in 3.15x standard's wall time" in f for f in summary["timings"])
    assert "3.15x [" in (compare_run[0] / "table.md").read_text()
    for recipe in RECIPE_SCALE:  # the seconds, summed over the training epochs (epoch 0 trains nothing)
        walls = [EPOCHS * STD_WALL[s] * COST[recipe][s] for s in SEEDS]
        row = summary["bases"][BASE]["recipes"][recipe]
        assert row["train_wall_s"] == pytest.approx(np.mean(walls))
        assert row["train_cpu_s"] == pytest.approx(2 * np.mean(walls))


def test_ablation_is_its_own_verdict(compare_run):
    """regularized vs constraint: larger margins on the same draws make every point robust under
    constraint robust under regularized too (nested sets): a gain beyond the paired noise over points and
    seeds; the tracked mean margins differ by 0 and 0.02, an interval over 2 seeds that straddles 0."""
    _, _, summary = compare_run
    entry = summary["bases"][BASE]
    assert set(entry["ablations"]) == {"regularized vs constraint"}  # large-margin is not in the run
    v = entry["ablations"]["regularized vs constraint"]
    assert v["baseline"] == "constraint" and "orthogonality" in v["question"]
    ref = next(r for r in v["robust_accuracy"] if r["reference"])
    con = [_margins("constraint", s)[0] for s in SEEDS]
    reg = [_margins("regularized", s)[0] for s in SEEDS]
    gained = sum(int(((c <= 1.0) & (r > 1.0)).sum()) for c, r in zip(con, reg, strict=True))
    lost = sum(int(((c > 1.0) & (r <= 1.0)).sum()) for c, r in zip(con, reg, strict=True))
    assert lost == 0 and ref["delta"] == pytest.approx(gained / (2 * N))
    assert v["beats"]["robust_accuracy"] is True and ref["beyond_noise"]
    assert v["mean_margin"]["diff"] == pytest.approx(0.01) and v["beats"]["mean_margin_beyond_noise"] is False
    assert v["beats"]["point_margin"] is True  # the bound on every correct point grew by 2.2/1.6
    said = [f for f in summary["findings"] if f.startswith("ablation (")]
    assert any("regularized raises the test mean margin over constraint" in f for f in said)
    assert any("improves the worst-case robust accuracy at eps=1 (constraint" in f for f in said)


def test_findings_rank_the_recipes(compare_run):
    _, _, summary = compare_run
    ranking = summary["bases"][BASE]["ranking"]
    assert [r for r, _ in ranking["robust_accuracy"]] == ["regularized", "constraint", "standard"]
    assert [r for r, _ in ranking["point_mean_margin"]] == ["regularized", "constraint", "standard"]
    assert any(
        f.startswith(f"{BASE}: highest certified accuracy at eps=1: regularized") for f in summary["findings"]
    )


def test_figures_are_written_and_shown_in_the_findings(compare_run, tmp_path):
    run_dir, _, _ = compare_run
    written = {p.name for p in plot_compare(run_dir)}
    assert {"pareto.png", "point_margin_histograms.png", "robustness_band.png"} <= written
    for name in ("pareto.png", "point_margin_histograms.png", "robustness_band.png"):
        assert (run_dir / "figures" / name).stat().st_size > 10_000, name
    _, md_path = write_report([run_dir], tmp_path / "report")
    md = md_path.read_text()
    findings = md.split("## Findings", 1)[1].split("## Runs", 1)[0]
    assert "pareto.png" in findings and "robustness_band.png" in findings
    assert "regularized costs 3.15x standard" in findings and "ablation" in findings
    assert f"{BASE}: recipes side by side" in md.split("## Run ", 1)[1]  # table.md, beside table.csv


def test_methods_quick_preset_parses():
    """The preset names the poster's recipes and the four methods that train on both of its bases (the
    certified ones collapse on its CNN: docs/results.md section 9); every sub-run config builds."""
    raw = load_config(CONFIGS / "methods-quick.toml")
    want = ["standard", "constraint", "regularized", "pgd-at", "trades", "mma", "large-margin"]
    assert raw["recipes"] == want and set(raw["params"]) <= set(raw["recipes"])
    kind, cfg = build_config(raw)  # every sub-run config is built and checked here
    assert kind == "compare" and [b.name for b in cfg.bases] == ["mnist-mlp", "mnist-cnn"]
    assert all(b.config["data"]["n_train"] <= 5000 for b in cfg.bases) and cfg.jobs == 2
    assert cfg.recipes == tuple(want)


@pytest.mark.parametrize(
    ("name", "norm", "eps"),
    [("methods-medium", "L2", {"mnist-mlp": None}), ("methods-full", "Linf", {"mnist-cnn": 0.3}),
     ("methods-full-l2", "L2", {"mnist-cnn": 2.0, "cifar-cnn": 0.5})],
)  # fmt: skip
def test_the_longer_methods_presets_build_every_sub_run(name, norm, eps):
    """Every recipe of the medium and GPU presets, with its [params.*], builds a valid sub-run config for
    every base (unknown keys, bad norms or radii would fail here, not hours into a run)."""
    kind, cfg = build_config(load_config(CONFIGS / f"{name}.toml"))
    assert kind == "compare" and set(cfg.recipes) == set(RECIPES) and cfg.robustness.norm == norm
    assert {b.name: b.eps for b in cfg.bases if b.name in eps} == eps


def test_an_untrained_recipe_is_not_ranked_and_missing_times_give_no_ratio():
    """A model stuck at chance predicts one class and looks robust on it: ranked on clean accuracy only.
    One seed gives a ratio without interval; a run without times (an older loop) gives none."""
    mine = {
        "standard": {"clean_acc": 0.9, "worst@1": 0.3},
        "ibp": {"clean_acc": 0.11, "worst@1": 0.11 + 0.5},  # "robust" on the one class it predicts
        "trades": {"clean_acc": 0.85, "worst@1": 0.6},
    }
    ranking = _ranking(mine, 1.0)
    assert ranking["robust_accuracy"] == [["trades", 0.6], ["standard", 0.3]]
    assert [r for r, _ in ranking["clean_accuracy"]] == ["standard", "trades", "ibp"]
    one = cost_ratio([10.0], [25.0])
    assert one["ratio"] == pytest.approx(2.5) and one["ci"] is None and not one["beyond_noise"]
    assert cost_ratio([None, 3.0], [None, None])["ratio"] is None
