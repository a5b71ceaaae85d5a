"""``mip``: the exact margin of a ReLU network by SCIP, through a search on the radius.

For a point ``x0`` predicted as its label ``y`` the margin is ``min ||delta||_p`` over the points
``x0 + delta`` of the domain where some class ``k != y`` reaches ``f_k >= f_y`` (for a misclassified point:
where ``f_y >= f_j`` for every ``j``, reported negative by the sign rule of
:mod:`marginlab.estimators.base`). Rather than minimising the norm in one program (SCIP stalls at the
root node on MNIST-sized MLPs), the search of :mod:`marginlab.estimators.mip_point` keeps a bracket
``[lower, upper]``: ``lower`` a certified radius (crown's to start with, :mod:`marginlab.estimators.crown`),
``upper`` the norm of the closest adversarial point found (to start with the attack ``upper``, default
``best``), and tests radii in between: bound propagation over the smaller ball makes most ReLUs stable
and the big-M constants of the rest small, PGD and the closest point of a linear region
(:mod:`marginlab.estimators.mip_local`) find adversarial points, and SCIP proves that a ball has none
(:mod:`marginlab.bounds.milp`). A point is ``exact`` when ``upper - lower <= rtol * upper``.

Per point, within ``time_limit`` seconds: ``status`` ``"exact"``, ``"time limit"`` (the bracket is what is
known) or ``"unsolved"`` (no adversarial point found; ``upper`` is the attack's radius, or ``inf``); in
the box domain, a point with no adversarial image at all (bound propagation or SCIP certifies the ball
that holds the box) is ``"exact"`` with ``upper = inf``. The estimator returns the signed ``upper`` of
every point: the exact margin (to ``rtol``) where the status says so, else an upper bound, so
:meth:`Mip.result_kind` is ``exact`` only when every point is. :meth:`Mip.point_columns` gives ``status``
and the signed ``lower`` and ``upper``; :meth:`Mip.point_arrays` the perturbations ``delta [N,*in]``
(NaN where none); ``Mip.last_details`` the :class:`~marginlab.estimators.mip_point.PointResult` of every
point (Python use only). Every perturbation is checked by a forward pass of the float64 model
(``verified``: its target's value within ``VERIFY_TOL`` of reaching 0, or above).

Needs the optional extra ``marginlab[exact]`` (``pyscipopt``).
"""

from __future__ import annotations

import copy
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch
from torch import nn

from marginlab.base.config import check_count
from marginlab.base.errors import ConfigError
from marginlab.bounds.milp import network_blocks
from marginlab.bounds.network import network_graph
from marginlab.estimators.base import Estimator, MarginKind, build_estimator, register
from marginlab.estimators.crown import certified_radius
from marginlab.estimators.mip_point import VERIFY_TOL, PointResult, Setup, solve_point

__all__ = ["VERIFY_TOL", "Mip", "PointResult", "require_scip"]


def require_scip() -> ModuleType:
    """``pyscipopt``, or a one-line ConfigError naming the extra that installs it."""
    try:
        import pyscipopt
    except ImportError:
        raise ConfigError(
            "the mip estimator needs SCIP: pip install 'marginlab[exact]' (pyscipopt)"
        ) from None
    return pyscipopt


@register("mip")
@dataclass(kw_only=True)
class Mip(Estimator):
    """Exact margins by SCIP (see the module doc).

    ``domain``: ``"box"`` (default) or ``"rd"``; ``time_limit``: seconds per point; ``rtol``: a point is
    exact when ``upper - lower <= rtol * upper``; ``upper``: the upper-bound estimator (an attack, or
    ``best``) giving the initial upper end; ``jobs``: worker processes solving the points of a batch
    (forked, one thread each; 1: in this process).
    """

    kind = MarginKind.EXACT
    needs = frozenset({"layers"})
    batch_size: int = 16
    time_limit: float = 60.0
    rtol: float = 1e-4
    upper: str = "best"
    jobs: int = 1
    last_details: list[PointResult] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.time_limit > 0:
            raise ConfigError(f"mip: time_limit must be positive seconds, got {self.time_limit}")
        if not 0 < self.rtol < 1:
            raise ConfigError(f"mip: rtol must be in (0, 1), got {self.rtol}")
        check_count(self.param_name("jobs"), self.jobs)
        require_scip()

    def _prepare(self, model: nn.Module, x1: torch.Tensor, p: float) -> None:
        graph = network_graph(model, tuple(x1.shape[1:]))
        model64 = copy.deepcopy(model).to("cpu", torch.float64).eval()
        box = self.domain == "box"
        self._setup = Setup(
            graph, network_blocks(graph), model64, p, box, self.time_limit, self.rtol, require_scip()
        )
        self.last_details = []
        self._signs: list[float] = []  # +1 correctly classified, -1 not: the sign rule of the values

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        with torch.no_grad():
            pred = model(x).argmax(dim=1).cpu()
        hi = build_estimator(self.upper, batch_size=len(x))(model, x, y, p=p).abs()
        xc, yc = x.detach().cpu().double(), y.cpu()
        sign = (pred == yc).double() * 2 - 1
        s = self._setup
        lo = certified_radius(s.graph, xc, yc, sign, p=p, box=s.box, hi=hi, rtol=1e-3)
        points = [(xc[i], int(yc[i]), int(pred[i]), float(lo[i]), float(hi[i])) for i in range(len(x))]
        results = _solve_all(s, points, self.jobs)
        self.last_details.extend(results)
        self._signs.extend(sign.tolist())
        upper = torch.tensor([r.upper for r in results], dtype=torch.float64)
        return torch.where(pred == yc, upper, -upper)

    def result_kind(self) -> MarginKind:
        """``exact`` when every point of the last call is exact, else ``upper bound`` (the values are then
        the norms of the closest adversarial points found, or the attack's)."""
        if all(r.status == "exact" for r in self.last_details):
            return MarginKind.EXACT
        return MarginKind.UPPER

    def point_columns(self) -> dict[str, list[object]]:
        """``status``, and the bracket's ``lower`` and ``upper`` ends signed like the margins, per point."""
        pairs = list(zip(self._signs, self.last_details, strict=True))
        return {
            "status": [r.status for r in self.last_details],
            "lower": [s * r.lower for s, r in pairs],
            "upper": [s * r.upper for s, r in pairs],
        }

    def point_arrays(self) -> dict[str, np.ndarray]:
        """``delta [N,*in]`` (float64): the closest perturbation found per point, NaN where none."""
        if not self.last_details:
            return {}
        shape = next((tuple(r.delta.shape) for r in self.last_details if r.delta is not None), None)
        if shape is None:
            return {}
        out = np.full((len(self.last_details), *shape), np.nan)
        for i, r in enumerate(self.last_details):
            if r.delta is not None:
                out[i] = r.delta.numpy()
        return {"delta": out}


Point = tuple[torch.Tensor, int, int, float, float]  # (x0 [*in] float64, y, prediction, lo, hint)
_WORK: tuple[Setup, list[Point]] | None = None  # what forked workers inherit


def _solve(setup: Setup, point: Point) -> PointResult:
    """One point: exact ``+inf`` where bound propagation certified the whole box, else the search."""
    x0, y, pred, lo, hint = point
    if math.isinf(lo):  # nothing adversarial anywhere in the box
        return PointResult("exact", math.inf, math.inf, -1, None, False, math.nan, 0.0, 0)
    return solve_point(setup, x0, y, pred, lo, hint)


def _solve_index(i: int) -> PointResult:
    assert _WORK is not None
    return _solve(_WORK[0], _WORK[1][i])


def _one_thread() -> None:
    torch.set_num_threads(1)


def _solve_all(setup: Setup, points: list[Point], jobs: int) -> list[PointResult]:
    """Every point's result, in ``jobs`` forked worker processes (one point at a time each, so that slow
    points do not hold up the others), or here when ``jobs`` is 1 or fork is not available."""
    global _WORK
    jobs = min(jobs, len(points))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_solve(setup, pt) for pt in points]
    _WORK = (setup, points)
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_one_thread) as pool:
            return list(pool.map(_solve_index, range(len(points))))
    finally:
        _WORK = None
