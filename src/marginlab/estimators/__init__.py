"""Margin estimators behind one interface: ``estimator(model, x, y, p=2) -> signed margins [N]``.

Each estimator says what its number is (:class:`MarginKind`): ``exact-linear`` (exact),
``first-order`` and ``sampling`` (estimates), ``deepfool``/``ddn``/``fmn``/``fab``/``best`` (upper
bounds) and ``lipschitz`` (a certified lower bound). See :mod:`marginlab.estimators.base` for the
sign convention shared by all of them.
"""

from marginlab.estimators import attacks, crown, exact, first_order, lipschitz, mip, sampling  # noqa: F401
from marginlab.estimators.base import ESTIMATORS, Estimator, MarginKind, build_estimator, norm_order
from marginlab.estimators.best import MarginResult, combine_upper_bounds, estimate_margins

__all__ = [
    "MarginResult",
    "ESTIMATORS",
    "Estimator",
    "MarginKind",
    "build_estimator",
    "combine_upper_bounds",
    "estimate_margins",
    "norm_order",
]
