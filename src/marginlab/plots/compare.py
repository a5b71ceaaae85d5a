"""Figures of a ``compare`` run, drawn from its sub-runs' files alone.

- ``margin_curves.png``: per base (rows), mean and minimum margin vs epoch on the train and test subsets,
  one colour per recipe (the poster's "regularized vs standard" panels);
- ``histograms.png``: per base, the per-point margins at the end of training, train and test, one
  step histogram per recipe on shared bins;
- the recipes side by side (``pareto.png``, ``point_margin_histograms.png``, ``robustness_band.png``):
  :mod:`marginlab.plots.methods`;
- ``robustness.png``: per base, robust accuracy vs ε: the curve from the min-norm bound of every point
  (an upper bound), the first attack's own accuracy (circles) and the worst case (diamonds); with
  certificates, the certified curve (dotted, a lower bound) and the band up to the bound curve, shaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np

from marginlab.lab.names import (
    FIGURES,
    HISTOGRAMS_FIGURE,
    MARGIN_CURVES_FIGURE,
    METRICS,
    ROBUSTNESS,
    ROBUSTNESS_FIGURE,
    subrun_dir,
)
from marginlab.lab.readers import read_config, read_metrics, read_robustness, read_robustness_extra
from marginlab.plots.common import fit_ylim, margin_label, new_figure, recipe_style, save, shared_bins, styled
from marginlab.plots.methods import plot_methods
from marginlab.plots.training import draw_series, kind_of
from marginlab.robustness import robustness_curve
from marginlab.training.records import SPLITS, EpochRecord, MarginStat, Split
from marginlab.training.tracking import load_points

PANELS: tuple[tuple[Split, MarginStat], ...] = (
    ("train", "mean"),
    ("test", "mean"),
    ("train", "min"),
    ("test", "min"),
)


def _layout(run_dir: Path) -> tuple[list[str], list[str], list[int]]:
    """Base names, recipes and seeds of a compare run, from its ``config.json``."""
    cfg = read_config(run_dir)
    return [b["name"] for b in cfg["bases"]], list(cfg["recipes"]), list(cfg["seeds"])


def _subruns(run_dir: Path, base: str, recipe: str, seeds: list[int]) -> list[Path]:
    """The finished sub-run directories of one base × recipe (missing ones are left out)."""
    paths = [subrun_dir(run_dir, base, recipe, s) for s in seeds]
    return [p for p in paths if (p / METRICS).is_file()]


def _records(sub: Path) -> list[EpochRecord]:
    """The metric records of a sub-run (a ``train`` run)."""
    return cast("list[EpochRecord]", read_metrics(sub))


def _estimator(path: Path) -> str:
    return str(read_config(path)["tracking"]["estimators"][0])


def _norm(path: Path) -> float | None:
    return read_config(path).get("tracking", {}).get("p")


@styled
def plot_compare(run_dir: str | Path) -> list[Path]:
    """Draw every figure into ``run_dir/figures``; returns the files written."""
    run_dir = Path(run_dir)
    bases, recipes, seeds = _layout(run_dir)
    figures = run_dir / FIGURES
    out = [plot_margin_curves(run_dir, bases, recipes, seeds, figures / MARGIN_CURVES_FIGURE)]
    out.append(plot_histograms(run_dir, bases, recipes, seeds, figures / HISTOGRAMS_FIGURE))
    if _has_robustness(run_dir, bases, recipes, seeds):
        out.append(plot_robustness(run_dir, bases, recipes, seeds, figures / ROBUSTNESS_FIGURE))
    out += plot_methods(run_dir, figures)
    return out


def compare_figures(run_dir: str | Path) -> list[str]:
    """The figures (names under ``figures/``) that :func:`plot_compare` always draws from the comparison's
    files (the training-methods figures, drawn when their data allow, aside): what a report expects to
    find on disk."""
    run_dir = Path(run_dir)
    bases, recipes, seeds = _layout(run_dir)
    names = [MARGIN_CURVES_FIGURE, HISTOGRAMS_FIGURE]
    return names + ([ROBUSTNESS_FIGURE] if _has_robustness(run_dir, bases, recipes, seeds) else [])


def _has_robustness(run_dir: Path, bases: list[str], recipes: list[str], seeds: list[int]) -> bool:
    """Whether any sub-run holds a robustness result (the robustness figure is drawn then)."""
    return any(
        (p / ROBUSTNESS).is_file() for b in bases for r in recipes for p in _subruns(run_dir, b, r, seeds)
    )


def plot_margin_curves(
    run_dir: Path, bases: list[str], recipes: list[str], seeds: list[int], path: Path
) -> Path:
    """Rows: bases; columns: train/test mean and min margin vs epoch; one colour and line style per recipe.

    The untrained model (epoch 0) and the first quarter of training can have margins an order of
    magnitude away from the rest (e.g. a CNN on its initial plateau), so each panel's y-range is fitted
    to the later epochs; earlier points may lie off the axes.
    """
    fig, axes = new_figure(len(bases), len(PANELS), size=(3.6 * len(PANELS), 2.9 * len(bases)))
    axes = np.asarray(axes).reshape(len(bases), len(PANELS))
    for i, base in enumerate(bases):
        drawn: list[list[tuple[list[int], list[float]]]] = [[] for _ in PANELS]
        cutoff, ylabel = 1, margin_label(None)
        for recipe in recipes:
            style = recipe_style(recipe, recipes)
            for k, sub in enumerate(_subruns(run_dir, base, recipe, seeds)):
                records, name = _records(sub), _estimator(sub)
                cutoff = max(1, max((int(r["epoch"]) for r in records), default=0) // 4)
                ylabel = margin_label(kind_of(records, name), _norm(sub))
                for j, (split, stat) in enumerate(PANELS):
                    label = recipe if k == 0 else None  # one legend entry per recipe, however many seeds
                    curve = draw_series(
                        axes[i, j], records, split, name, stat, label=label, alpha=0.85, **style
                    )
                    drawn[j].append(curve)
                    axes[i, j].set_title(f"{base}: {split} {stat} margin ({name})")
        for ax, curves in zip(axes[i], drawn, strict=True):
            fit_ylim(ax, curves, from_epoch=cutoff)
            ax.set_xlabel(f"epoch (y-range fitted to epochs >= {cutoff})")
            ax.set_ylabel(ylabel)
            ax.axhline(0.0, color="0.5", linewidth=0.6)
            ax.legend()
    fig.tight_layout()
    return save(fig, path)


def _last_margins(sub: Path, split: str) -> np.ndarray | None:
    """Per-point margins of the last saved epoch of a sub-run (its first tracked estimator)."""
    points = load_points(sub)
    if not points:
        return None
    return points[max(points)].get(split, {}).get(_estimator(sub))


def plot_histograms(
    run_dir: Path, bases: list[str], recipes: list[str], seeds: list[int], path: Path
) -> Path:
    """Rows: bases; columns: train, test; end-of-training margin histograms per recipe (seeds pooled)."""
    fig, axes = new_figure(len(bases), len(SPLITS), size=(4.6 * len(SPLITS), 2.9 * len(bases)))
    axes = np.asarray(axes).reshape(len(bases), len(SPLITS))
    for i, base in enumerate(bases):
        for j, split in enumerate(SPLITS):
            ax = axes[i, j]
            data: dict[str, np.ndarray] = {}
            kind, norm = None, None
            for recipe in recipes:
                subs = _subruns(run_dir, base, recipe, seeds)
                if subs:
                    kind, norm = kind_of(_records(subs[0]), _estimator(subs[0])), _norm(subs[0])
                parts = [p for p in (_last_margins(s, split) for s in subs) if p is not None]
                if parts:
                    data[recipe] = np.concatenate(parts).astype(np.float64)
            bins = shared_bins(data.values())
            if bins is None:
                ax.set_visible(False)
                continue
            lo, hi = bins[0], bins[-1]
            for recipe, a in data.items():
                ax.hist(
                    np.clip(a, lo, hi),
                    bins=bins,
                    histtype="step",
                    linewidth=1.4,
                    **recipe_style(recipe, recipes),
                    label=f"{recipe} (mean {np.mean(a):.3g})",
                )
            ax.axvline(0.0, color="0.5", linewidth=0.6)
            ax.set_title(f"{base}: {split} margins at the end of training")
            ax.set_xlabel(margin_label(kind, norm) + ", clipped to its 0.5-99.5% range")
            ax.set_ylabel("points")
            ax.legend()
    fig.tight_layout()
    return save(fig, path)


def _evaluated(subruns: list[Path]) -> list[Path]:
    """The sub-runs whose robustness was evaluated (``robustness.json``)."""
    return [sub for sub in subruns if (sub / ROBUSTNESS).is_file()]


def plot_robustness(
    run_dir: Path, bases: list[str], recipes: list[str], seeds: list[int], path: Path
) -> Path:
    """One panel per base: bound curves per recipe, the first attack's points and the worst case."""
    fig, axes = new_figure(1, len(bases), size=(4.4 * len(bases), 3.4))
    axes = np.atleast_1d(np.asarray(axes, dtype=object)).ravel()
    for ax, base in zip(axes, bases, strict=True):
        right, norm, banded = 0.0, "", False
        for recipe in recipes:
            evaluated = _evaluated(_subruns(run_dir, base, recipe, seeds))
            results = [read_robustness(sub) for sub in evaluated]
            if not results:
                continue
            style, res = recipe_style(recipe, recipes), results[0]
            color = style["color"]
            norm = str(res.norm)
            eps = np.asarray(res.eps)
            right = max(right, float(eps.max()) * 1.15)
            upper = [u for u in (r.margin_upper() for r in results) if u is not None]
            lower = [low for low in (r.margin_lower() for r in results) if low is not None]
            banded |= bool(lower)
            if lower:  # the certified curve, the band's lower end
                # from the smallest ε: points the min-norm bound breaks there are not certified
                grid, low = robustness_curve(np.concatenate(lower), eps=np.linspace(eps.min(), right, 200))
                ax.plot(grid, low, color=color, linestyle=":", linewidth=1.0, label=f"{recipe}: certified")
                if upper:
                    _, high = robustness_curve(np.concatenate(upper), eps=grid)
                    ax.fill_between(grid, low, np.maximum(high, low), color=color, alpha=0.1, linewidth=0)
            if upper:
                grid, acc = robustness_curve(np.concatenate(upper), eps=np.linspace(0, right, 200))
                ax.plot(
                    grid,
                    acc,
                    linewidth=1.0,
                    alpha=0.7,
                    **style,
                    label=f"{recipe}: {(res.bound or {}).get('estimator')} bound",
                )
            first = res.settings["attacks"][0]
            own = np.mean([[np.nan if v is None else v for v in r.accuracy[first]] for r in results], axis=0)
            worst = np.mean([r.worst_case for r in results], axis=0)
            ax.plot(eps, own, "o", color=color, markerfacecolor="none", label=f"{recipe}: {first}")
            ax.plot(
                eps,
                worst,
                marker="D",
                color=color,
                linestyle=style["linestyle"],
                markersize=4,
                linewidth=0.8,
                label=f"{recipe}: worst case",
            )
            reference = read_robustness_extra(evaluated[0])["reference_eps"]
            ax.axvline(reference, color="0.4", linestyle=":", linewidth=0.8)
        ax.set_title(f"{base}: robust accuracy")
        ax.set_xlabel(f"ε ({norm} norm of the perturbation)" if norm else "ε")
        ax.set_ylabel(
            "robust accuracy (band: certified to upper bound)" if banded else "robust accuracy (upper bound)"
        )
        ax.set_xlim(0, right or 1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save(fig, path)
