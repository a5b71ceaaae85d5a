"""The robustness figure: robust accuracy vs ε, from per-point minimal perturbations (the curve of
:func:`marginlab.robustness.robustness_curve`) and the accuracies each attack stage reached; with
certificates, the certified curve below (the survival function of the certified radii, a lower bound)
and the band between it and the min-norm curve shaded: the true robust accuracy lies inside."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from marginlab.base.errors import ConfigError
from marginlab.base.inputs import ArrayInput
from marginlab.plots.common import STYLE
from marginlab.robustness.curve import robustness_curve
from marginlab.robustness.evaluate import RobustnessResult

__all__ = ["plot_robustness"]

CERTIFIED = "C4"  # the certified curve, its band and markers (the stages take C1, C2... in order)
_STAGE_STYLE = {"bound": ("s", "min-norm bound"), "pgd": ("o", "PGD"), "autoattack": ("D", "AutoAttack")}


def plot_robustness(
    margins: ArrayInput | Mapping[str, ArrayInput] | None = None,
    result: RobustnessResult | None = None,
    *,
    title: str | None = None,
    eps_max: float | None = None,
) -> Figure:
    """Robust accuracy vs ε: curves from per-point minimal perturbations (one per label when ``margins``
    is a mapping) and the accuracies each attack stage of ``result`` reached. Returns the Figure (Agg).

    A curve is exact when its margins are exact (a label containing "exact"), else an upper bound, like
    every attack's accuracy (an attack that fails to find an adversarial example proves nothing); the
    y-axis says which. When ``result`` holds certified radii, their curve (a lower bound) is drawn too,
    the band up to the first curve is shaded, and the certified accuracies are marked at the radii.
    """
    if margins is None and result is None:
        raise ConfigError("plot_robustness needs margins, a RobustnessResult, or both")
    with matplotlib.rc_context(STYLE):
        return _draw(margins, result, title, eps_max)


def _draw(
    margins: ArrayInput | Mapping[str, ArrayInput] | None,
    result: RobustnessResult | None,
    title: str | None,
    eps_max: float | None,
) -> Figure:
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    curves = (
        dict(margins)
        if isinstance(margins, Mapping)
        else {}
        if margins is None
        else {"min-norm bound": margins}
    )
    right = eps_max
    for label, m in curves.items():
        grid, acc = robustness_curve(m)
        if right is None:
            finite = grid[np.isfinite(grid)]
            right = max(float(np.quantile(finite, 0.99)) * 1.1 if finite.size else 1.0, 1e-3)
        ax.plot(np.append(grid, right), np.append(acc, acc[-1]), drawstyle="steps-post", label=label)
    lower = None if result is None else result.margin_lower()
    if result is not None and lower is not None:
        right = _draw_certified(ax, lower, curves, result.eps[0], right)
    if result is not None:
        if result.certified is not None:
            ax.plot(
                result.eps, result.certified, marker="v", linestyle="none", color=CERTIFIED, label="certified"
            )
        for stage in result.stages:
            marker, label = _STAGE_STYLE.get(stage, ("^", stage))
            after = " (after earlier stages)" if stage != result.stages[0] else ""
            ax.plot(
                result.eps,
                [np.nan if v is None else v for v in result.accuracy[stage]],
                marker=marker,
                linestyle="none",
                label=f"{label}{after}",
            )
        ax.plot(result.eps, result.worst_case, color="black", linewidth=0.8, label="worst case")
    ax.set_xlabel(f"ε ({result.norm} norm of the perturbation)" if result else "ε (norm of the perturbation)")
    exact = bool(curves) and all("exact" in str(label).lower() for label in curves)
    ax.set_ylabel(
        "robust accuracy (curve exact; attack points: upper bounds)"
        if exact and result is not None
        else "robust accuracy (exact)"
        if exact
        else "robust accuracy (certified lower bound to attack upper bound)"
        if lower is not None
        else "robust accuracy (upper bound)"
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0, right=right)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _draw_certified(
    ax: Axes, lower: np.ndarray, curves: dict[str, ArrayInput], start: float, right: float | None
) -> float:
    """The certified curve from the radii ``lower [N]`` and, under the first upper curve of ``curves``,
    the shaded band, from ``start`` (the smallest evaluated ε: points broken there by the min-norm bound
    are not certified, so below it the curve would understate); returns the x-range's right end."""
    if right is None:
        finite = lower[np.isfinite(lower) & (lower > 0)]
        right = max(float(np.quantile(finite, 0.99)) * 1.1 if finite.size else 1.0, 1e-3)
    grid = np.linspace(start, max(right, start), 400)
    _, low = robustness_curve(lower, eps=grid)
    ax.plot(grid, low, color=CERTIFIED, linewidth=1.0, label="certified radius (lower bound)")
    if curves:
        _, high = robustness_curve(next(iter(curves.values())), eps=grid)
        ax.fill_between(
            grid, low, np.maximum(high, low), color=CERTIFIED, alpha=0.12, linewidth=0, label="band"
        )
    return right
