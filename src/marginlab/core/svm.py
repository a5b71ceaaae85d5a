"""Hard-margin linear SVM for separable binary data, checked after solving.

``hard_margin_svm`` solves ``min ||w||^2 s.t. y_i (w.x_i + b) >= 1`` with scikit-learn and then checks
every constraint itself, raising :class:`~marginlab.base.errors.NotSeparableError` when one fails by more
than ``tol`` (the data are not linearly separable, or the solver stopped short of the hard margin).

Three treatments of the bias, because they have different optima:

* ``"free"`` (default): the classical SVM, bias unpenalised; ``SVC(kernel="linear")`` (libsvm SMO) with
  a huge C. On MNIST 0-vs-1 (12,665 images, byte/255) its geometric margin is 0.42452.
* ``"regularized"``: ``min ||w||^2 + b^2``, the max-margin direction of the augmented points [x; 1].
  This is the limit direction of gradient descent on the logistic loss of a model *with* a bias
  (Soudry et al. 2018 treat the bias as a weight on a constant feature). Solved by ``LinearSVC`` (dual
  coordinate descent, no intercept) on [x; 1]. On MNIST 0-vs-1 its cosine with the free solution is only
  about 0.945, so compare gradient descent with this one.
* ``"none"``: no bias (b = 0), for models without one; ``LinearSVC`` on x.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from marginlab.base.errors import ConfigError, DataError, NotSeparableError

BiasMode = Literal["free", "regularized", "none"]
_C = 1e7  # large enough that no dual variable reaches it on separable data scaled like images
_MAX_ITER = 100_000  # bounds the time spent before reporting non-separable data (~2 min on full MNIST)


@dataclass(frozen=True)
class SVMResult:
    """A hard-margin SVM.

    ``w`` [D] float64 and ``b`` define ``f(x) = w.x + b``, scaled so that ``min_i y_i f(x_i) ~= 1``;
    ``margin`` is the geometric L2 margin ``min_i y_i f(x_i) / ||w||_2`` in input space; ``n_support`` the
    number of points on the margin (``y_i f(x_i) <= 1 + tol``); ``bias`` the bias treatment.
    """

    w: Tensor
    b: float
    margin: float
    n_support: int
    bias: str


def _as_numpy(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ``x`` [N, ...] to float64 [N, D] and check ``y`` [N] in {-1, +1}."""
    xa = torch.as_tensor(x).detach().reshape(len(x), -1).to(torch.float64).numpy()
    ya = torch.as_tensor(y).detach().reshape(-1).to(torch.float64).numpy()
    if len(ya) != len(xa):
        raise ConfigError(f"got {len(ya)} labels for {len(xa)} points")
    if not np.isin(ya, (-1.0, 1.0)).all():
        raise DataError("SVM labels must be -1/+1; load the data with labels='pm1'")
    if len(np.unique(ya)) < 2:
        raise DataError("the SVM needs points of both classes (-1 and +1)")
    return xa, ya


def _solve(xa: np.ndarray, ya: np.ndarray, bias: BiasMode, tol: float) -> tuple[np.ndarray, float]:
    """Run the scikit-learn solver for ``bias``; returns (w [D], b)."""
    # scikit-learn is imported here, not at the top: it takes a second and a half to import, which every
    # `marginlab` command (even --help) would pay; only the logreg-gd experiment solves SVMs.
    from sklearn.svm import SVC, LinearSVC

    solver_tol = tol * 1e-2  # the stopping rule must be tighter than the feasibility check
    if bias == "free":
        svc = SVC(kernel="linear", C=_C, tol=solver_tol, max_iter=_MAX_ITER, cache_size=500)
        svc.fit(xa, ya)
        return svc.coef_.ravel().astype(np.float64), float(svc.intercept_[0])
    z = np.hstack([xa, np.ones((len(xa), 1))]) if bias == "regularized" else xa
    lin = LinearSVC(
        loss="hinge", dual=True, C=_C, fit_intercept=False, tol=solver_tol, max_iter=_MAX_ITER, random_state=0
    )
    lin.fit(z, ya)
    theta = lin.coef_.ravel().astype(np.float64)
    return (theta[:-1], float(theta[-1])) if bias == "regularized" else (theta, 0.0)


def hard_margin_svm(
    x: Tensor | np.ndarray, y: Tensor | np.ndarray, *, tol: float = 1e-3, bias: BiasMode = "free"
) -> SVMResult:
    """Fit the hard-margin SVM to ``x`` [N, D] (or [N, C, H, W]) with labels ``y`` [N] in {-1, +1}.

    Raises ``NotSeparableError`` unless every point has ``y (w.x + b) >= 1 - tol`` afterwards.
    """
    if bias not in ("free", "regularized", "none"):
        raise ConfigError(f"unknown bias treatment {bias!r}; choose from: free, none, regularized")
    if not tol > 0:
        raise ConfigError(f"tol must be > 0, got {tol}")
    from sklearn.exceptions import ConvergenceWarning  # see _solve: scikit-learn is slow to import

    xa, ya = _as_numpy(x, y)
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always", ConvergenceWarning)
        w, b = _solve(xa, ya, bias, tol)
    stopped = any(issubclass(c.category, ConvergenceWarning) for c in caught)
    functional = ya * (xa @ w + b)
    worst = float(functional.min())
    if stopped or not math.isfinite(worst) or worst < 1.0 - tol:
        raise NotSeparableError(
            f"no hard-margin SVM (bias={bias}): min functional margin {worst:.4g} (needs >= 1 - tol), solver "
            f"{'stopped at' if stopped else 'converged within'} max_iter={_MAX_ITER}; the data are not "
            "linearly separable or the solver did not reach the hard margin"
        )
    return SVMResult(
        w=torch.from_numpy(w.copy()),
        b=b,
        margin=worst / float(np.linalg.norm(w)),
        n_support=int((functional <= 1.0 + tol).sum()),
        bias=bias,
    )


def direction_cosine(w1: Tensor, b1: float | Tensor, w2: Tensor, b2: float | Tensor) -> float:
    """Cosine between the directions ``[w1; b1]`` and ``[w2; b2]`` (``w`` [D] or [K, D], flattened).

    Returns NaN when either vector is zero (a direction is undefined, e.g. at a zero initialisation).
    """
    # float64 throughout: a Python float bias must not be rounded to float32 on the way in.
    f64 = torch.float64
    u = torch.cat([torch.as_tensor(w1, dtype=f64).reshape(-1), torch.as_tensor(b1, dtype=f64).reshape(-1)])
    v = torch.cat([torch.as_tensor(w2, dtype=f64).reshape(-1), torch.as_tensor(b2, dtype=f64).reshape(-1)])
    if u.shape != v.shape:
        raise ConfigError(f"cannot compare directions of sizes {u.numel()} and {v.numel()}")
    nu, nv = float(u.norm()), float(v.norm())
    if nu == 0.0 or nv == 0.0:
        return math.nan
    return float(u @ v) / (nu * nv)
