"""The robustness curve (accuracy vs ε) from per-point minimal perturbations, and its figure.

A point with minimal adversarial perturbation of norm r (a margin upper bound; <= 0 for misclassified
points, inf when no adversarial example was found) counts as robust at ε iff r > ε, so the curve is the
empirical survival function of r: an *upper* bound on robust accuracy, to be drawn with the accuracies
that fixed-ε attacks actually reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from marginlab.errors import ConfigError
from marginlab.robustness.evaluate import RobustnessResult

__all__ = ["plot_robustness", "robustness_curve"]

_STAGE_STYLE = {"bound": ("s", "min-norm bound"), "pgd": ("o", "PGD"), "autoattack": ("D", "AutoAttack")}


def robustness_curve(margins_upper: Any, eps: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(eps [M], accuracy [M])`` with accuracy(ε) = share of points with margin > ε.

    Without ``eps`` the grid is 0 and every distinct finite positive margin (where the step function
    drops), so drawing it with ``drawstyle="steps-post"`` is exact. NaN margins count as not robust.
    """
    r = np.asarray(margins_upper, dtype=np.float64).ravel()
    if r.size == 0:
        raise ConfigError("robustness_curve needs at least one margin")
    r = np.where(np.isnan(r), -np.inf, r)
    if eps is None:
        finite = r[np.isfinite(r) & (r > 0)]
        grid = np.unique(np.concatenate([[0.0], finite]))
    else:
        grid = np.asarray(eps, dtype=np.float64).ravel()
    ranked = np.sort(r)
    # share with r > e = 1 - (number of r <= e) / N
    acc = 1.0 - np.searchsorted(ranked, grid, side="right") / r.size
    return grid, acc


def plot_robustness(
    margins: Any | Mapping[str, Any] | None = None,
    result: RobustnessResult | None = None,
    *,
    title: str | None = None,
    eps_max: float | None = None,
) -> Figure:
    """Robust accuracy vs ε: curves from per-point minimal perturbations (one per label when ``margins``
    is a mapping) and the accuracies each attack stage of ``result`` reached. Returns the Figure (Agg).

    A curve is exact when its margins are exact (a label containing "exact"), else an upper bound, like
    every attack's accuracy (an attack that fails to find an adversarial example proves nothing); the
    y-axis says which.
    """
    if margins is None and result is None:
        raise ConfigError("plot_robustness needs margins, a RobustnessResult, or both")
    # imported here: marginlab.plots selects the headless backend, which importing this package must not do
    from marginlab.plots.common import STYLE

    with matplotlib.rc_context(STYLE):
        return _draw(margins, result, title, eps_max)


def _draw(
    margins: Any | Mapping[str, Any] | None,
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
    if result is not None:
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
        else "robust accuracy (upper bound)"
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0, right=right)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
