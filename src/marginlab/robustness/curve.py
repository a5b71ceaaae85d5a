"""The robustness curve (accuracy vs ε) from per-point minimal perturbations (drawn by
:mod:`marginlab.plots.robustness`).

A point with minimal adversarial perturbation of norm r (a margin upper bound; <= 0 for misclassified
points, inf when no adversarial example was found) counts as robust at ε iff r > ε, so the curve is the
empirical survival function of r: an *upper* bound on robust accuracy, to be drawn with the accuracies
that fixed-ε attacks actually reached.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from marginlab.base.errors import ConfigError
from marginlab.base.inputs import ArrayInput

__all__ = ["robustness_curve"]


def robustness_curve(
    margins_upper: ArrayInput, eps: npt.ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(eps [M], accuracy [M])`` with accuracy(ε) = share of points with margin > ε, from per-point
    margin upper bounds ``margins_upper [N]`` (any shape; flattened) at the radii ``eps`` (any shape).

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
