"""The figures of a ``compare`` run that set the training recipes side by side, from its sub-runs' files.

- ``pareto.png``: per base, worst-case robust accuracy at the reference ε against clean accuracy, one
  point per recipe (the mean over seeds) with 95% intervals as bars (over seeds; with one seed, 2 s.e. of
  a proportion over the test points), marker area proportional to the training wall time relative to
  ``standard``; the recipes no other beats on both axes (the Pareto front) joined by a grey line;
- ``point_margin_histograms.png``: per base, the per-point margins of the fixed test points at the end of
  training, one step histogram per recipe on shared bins: the min-norm attack's upper bound and, where
  certificates were computed, the certified lower bound (seeds pooled);
- ``robustness_band.png``: per base, worst-case robust accuracy vs ε per recipe (ε = 0: clean accuracy
  on the same points), the certified accuracy below it (dotted, from the per-point certified radii) and
  the band between them shaded: the true robust accuracy lies inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marginlab.core.stats import paired_ci
from marginlab.lab.names import (
    PARETO_FIGURE,
    POINT_MARGINS_FIGURE,
    ROBUSTNESS,
    ROBUSTNESS_BAND_FIGURE,
    SUMMARY,
    subrun_dir,
)
from marginlab.lab.readers import (
    read_config,
    read_metrics,
    read_robustness,
    read_robustness_extra,
    read_summary,
)
from marginlab.plots.common import new_figure, norm_name, recipe_style, save, shared_bins
from marginlab.robustness import RobustnessResult, robustness_curve
from marginlab.training.records import training_seconds

COST_BASELINE = "standard"  # marker sizes are training times relative to this recipe's
BASE_MARKER = 80.0  # points² of a recipe as costly as the baseline


@dataclass
class RecipeResults:
    """What the figures need of one base × recipe, per finished and evaluated seed."""

    clean: list[float] = field(default_factory=list)  # test accuracy of the whole split
    robust: list[float] = field(default_factory=list)  # worst case at the reference ε
    wall: list[float | None] = field(default_factory=list)
    results: list[RobustnessResult] = field(default_factory=list)
    reference_eps: float = 0.0

    def interval(self, values: list[float], n: int) -> float:
        """Half-width of the 95% interval of the mean of ``values``: over seeds with two or more, else
        two standard errors of a proportion over ``n`` points."""
        ci = paired_ci([0.0] * len(values), values)["ci"]
        if ci is not None:
            return (ci[1] - ci[0]) / 2
        p = float(np.mean(values)) if values else 0.0
        return 2 * float(np.sqrt(max(p * (1 - p), 0.0) / max(n, 1)))


def gather(run_dir: Path, base: str, recipe: str, seeds: list[int], reference_eps: float) -> RecipeResults:
    """The evaluated sub-runs of one base × recipe (a seed without ``robustness.json`` is left out)."""
    out = RecipeResults(reference_eps=reference_eps)
    for seed in seeds:
        sub = subrun_dir(run_dir, base, recipe, seed)
        if not (sub / ROBUSTNESS).is_file() or not (sub / SUMMARY).is_file():
            continue
        res = read_robustness(sub)
        out.results.append(res)
        out.clean.append(float(read_summary(sub).get("clean_accuracy", {}).get("test", res.clean_accuracy)))
        out.robust.append(res.at(reference_eps) if _has(res, reference_eps) else float("nan"))
        out.wall.append(training_seconds(read_metrics(sub))[0])
    return out


def _has(res: RobustnessResult, eps: float) -> bool:
    return any(abs(e - eps) <= 1e-9 * max(1.0, eps) for e in res.eps)


def load_all(run_dir: Path) -> tuple[list[str], list[str], dict[str, dict[str, RecipeResults]]]:
    """Base names, recipes and, per base and recipe, its :class:`RecipeResults` (from ``config.json``)."""
    cfg = read_config(run_dir)
    recipes, seeds = list(cfg["recipes"]), list(cfg["seeds"])
    bases = [b["name"] for b in cfg["bases"]]
    data = {}
    for b in cfg["bases"]:
        ref = _reference_eps(run_dir, b["name"], recipes, seeds)
        data[b["name"]] = {r: gather(run_dir, b["name"], r, seeds, ref) for r in recipes}
    return bases, recipes, data


def _reference_eps(run_dir: Path, base: str, recipes: list[str], seeds: list[int]) -> float:
    """The reference ε a base's sub-runs were evaluated at (``reference_eps`` of their robustness files)."""
    for r in recipes:
        for s in seeds:
            path = subrun_dir(run_dir, base, r, s) / ROBUSTNESS
            if path.is_file():
                return float(read_robustness_extra_eps(path.parent))
    return 0.0


def read_robustness_extra_eps(sub: Path) -> float:
    """The ``reference_eps`` recorded beside a sub-run's robustness result (its largest ε if none)."""
    extra = read_robustness_extra(sub).get("reference_eps")
    return float(extra) if isinstance(extra, int | float) else max(read_robustness(sub).eps)


def plot_methods(run_dir: Path, figures: Path) -> list[Path]:
    """Draw the three figures of this module into ``figures`` (none when nothing was evaluated)."""
    bases, recipes, data = load_all(run_dir)
    if not any(d.results for per in data.values() for d in per.values()):
        return []
    return [
        plot_pareto(bases, recipes, data, figures / PARETO_FIGURE),
        plot_point_margins(bases, recipes, data, figures / POINT_MARGINS_FIGURE),
        plot_robustness_band(bases, recipes, data, figures / ROBUSTNESS_BAND_FIGURE),
    ]


def _cost_ratio(d: RecipeResults, baseline: RecipeResults | None) -> float | None:
    """Mean training wall time of ``d`` over the baseline's (None when either lacks times)."""
    if baseline is None:
        return None
    mine = [w for w in d.wall if w is not None]
    theirs = [w for w in baseline.wall if w is not None]
    return float(np.mean(mine) / np.mean(theirs)) if mine and theirs and np.mean(theirs) > 0 else None


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The recipes no other recipe matches or beats on both coordinates (one strictly), by x."""
    front = [
        r
        for r, (x, y) in points.items()
        if not any((x2 >= x and y2 >= y and (x2 > x or y2 > y)) for r2, (x2, y2) in points.items() if r2 != r)
    ]
    return sorted(front, key=lambda r: points[r][0])


def plot_pareto(
    bases: list[str], recipes: list[str], data: dict[str, dict[str, RecipeResults]], path: Path
) -> Path:
    """One panel per base: robust vs clean accuracy per recipe (see the module doc)."""
    fig, axes = new_figure(1, len(bases), size=(5.0 * len(bases), 4.2))
    axes = np.atleast_1d(np.asarray(axes, dtype=object)).ravel()
    for ax, base in zip(axes, bases, strict=True):
        per, points = data[base], {}
        for recipe in recipes:
            d = per[recipe]
            if not d.results:
                continue
            x, y = float(np.mean(d.clean)), float(np.nanmean(d.robust))
            points[recipe] = (x, y)
            n = d.results[0].n
            ratio = _cost_ratio(d, per.get(COST_BASELINE))
            color = recipe_style(recipe, recipes)["color"]
            ax.errorbar(
                x, y, xerr=d.interval(d.clean, 10_000), yerr=d.interval(d.robust, n),
                color=color, linewidth=0.9, capsize=2, zorder=2,
            )  # fmt: skip
            size = BASE_MARKER * (ratio if ratio is not None else 1.0)
            label = f"{recipe} ({ratio:.2g}x cost)" if ratio is not None else recipe
            ax.scatter([x], [y], s=size, color=color, alpha=0.75, edgecolors="k", label=label, zorder=3)
            ax.annotate(recipe, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
        front = pareto_front(points)
        if len(front) > 1:
            ax.plot(*zip(*(points[r] for r in front), strict=True), color="0.5", linewidth=0.8, zorder=1)
        ref = next((d.reference_eps for d in per.values() if d.results), 0.0)
        ax.set_title(f"{base}: robust vs clean accuracy (grey: Pareto front)")
        ax.set_xlabel("clean test accuracy")
        ax.set_ylabel(f"worst-case robust accuracy at ε = {ref:g}")
        ax.legend(fontsize=6, title="marker area: training time vs standard", title_fontsize=6)
    fig.tight_layout()
    return save(fig, path)


def _pooled(d: RecipeResults, lower: bool) -> np.ndarray | None:
    """The per-point margin bounds of every seed, pooled (None where a seed has none)."""
    parts = [r.margin_lower() if lower else r.margin_upper() for r in d.results]
    if not parts or any(p is None for p in parts):
        return None
    return np.concatenate([p for p in parts if p is not None])


def plot_point_margins(
    bases: list[str], recipes: list[str], data: dict[str, dict[str, RecipeResults]], path: Path
) -> Path:
    """Rows: bases; columns: the min-norm bound and the certified radius of the fixed test points; one
    step histogram per recipe on shared bins (clipped to the pooled 0.5-99.5% range)."""
    fig, axes = new_figure(len(bases), 2, size=(9.2, 3.2 * len(bases)))
    axes = np.asarray(axes).reshape(len(bases), 2)
    for i, base in enumerate(bases):
        for j, (lower, what) in enumerate(((False, "upper bound (attack)"), (True, "certified lower bound"))):
            ax = axes[i, j]
            values = {r: v for r in recipes if (v := _pooled(data[base][r], lower)) is not None}
            bins = shared_bins(values.values())
            if bins is None:
                ax.set_visible(False)
                continue
            lo, hi = bins[0], bins[-1]
            for recipe, v in values.items():
                mean = float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
                ax.hist(
                    np.clip(v, lo, hi), bins=bins, histtype="step", linewidth=1.3,
                    **recipe_style(recipe, recipes), label=f"{recipe} (mean {mean:.3g})",
                )  # fmt: skip
            ax.axvline(0.0, color="0.5", linewidth=0.6)
            res = next(d.results[0] for d in data[base].values() if d.results)
            ax.set_title(f"{base}: margin {what}, fixed test points")
            ax.set_xlabel(f"signed {norm_name(res.norm)} margin (clipped to its 0.5-99.5% range)")
            ax.set_ylabel("points")
            ax.legend(fontsize=6)
    fig.tight_layout()
    return save(fig, path)


def plot_robustness_band(
    bases: list[str], recipes: list[str], data: dict[str, dict[str, RecipeResults]], path: Path
) -> Path:
    """One panel per base: worst-case robust accuracy vs ε per recipe, the certified curve below it and
    the band between them (see the module doc)."""
    fig, axes = new_figure(1, len(bases), size=(5.0 * len(bases), 3.8))
    axes = np.atleast_1d(np.asarray(axes, dtype=object)).ravel()
    for ax, base in zip(axes, bases, strict=True):
        right, norm = 0.0, ""
        for recipe in recipes:
            d = data[base][recipe]
            if not d.results:
                continue
            style, res = recipe_style(recipe, recipes), d.results[0]
            norm = str(res.norm)
            eps = np.asarray([0.0, *res.eps])
            worst = np.mean([[r.clean_accuracy, *r.worst_case] for r in d.results], axis=0)
            right = max(right, float(eps.max()) * 1.05)
            ax.plot(eps, worst, marker="D", markersize=3.5, linewidth=1.1, label=recipe, **style)
            lower = _pooled(d, lower=True)
            if lower is not None:
                grid = np.linspace(0.0, float(eps.max()), 200)
                _, cert = robustness_curve(lower, eps=grid)
                top = np.interp(grid, eps, worst)
                ax.plot(grid, cert, color=style["color"], linestyle=":", linewidth=0.9)
                alpha = 0.1 if len(recipes) <= 4 else 0.05  # many overlapping bands would turn grey
                ax.fill_between(grid, cert, np.maximum(top, cert), color=style["color"], alpha=alpha, lw=0)
            ax.axvline(d.reference_eps, color="0.4", linestyle=":", linewidth=0.8)
        ax.set_title(f"{base}: robust accuracy (dotted: certified; shaded: the band)")
        ax.set_xlabel(f"ε ({norm} norm of the perturbation)" if norm else "ε")
        ax.set_ylabel("accuracy: certified ≤ true robust ≤ worst case")
        ax.set_xlim(0, right or 1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save(fig, path)
