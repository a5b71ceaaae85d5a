"""One point's exact margin: a search on the radius with SCIP's radius tests (for ``mip``).

The search keeps a bracket ``lo <= margin <= hi``: ``lo`` a certified radius (at first crown's), ``hi`` the
norm of the closest adversarial point found, until ``hi - lo <= rtol * hi``. The first radius tested
lies just beyond the attack's (doubling while nothing is found, up to the ball that holds the box);
then each step tests one radius ``eps`` in ``(lo, hi)``:

1. bounds over the ball of radius ``eps`` (:func:`marginlab.bounds.crown.layer_bounds`, intersected with
   those of the closest larger ball tested): at a radius below ``hi`` most ReLUs are stable, and the
   unstable ones get small big-M constants;
2. targets (classes) that bound propagation proves cannot win on the ball are dropped;
3. PGD looks for an adversarial point in the ball (:func:`marginlab.estimators.mip_local.pgd`), from 0
   and from the best point so far;
4. else, per remaining target, SCIP maximises ``min_r (C f)_r`` over the ball
   (:meth:`marginlab.bounds.milp.MilpProgram.maximize`), stopping at the first positive point;
5. a found point moves ``hi`` to the norm of the closest point of its linear region
   (:func:`marginlab.estimators.mip_local.refine`); all targets infeasible moves ``lo`` to ``eps``.

The radius tested is ``hi (1 - rtol)`` (one test closes the bracket when the point found is the closest,
the common case after the refinement), and the midpoint after two such tests in a row found points.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor, nn

from marginlab.bounds.crown import Bounds, layer_bounds, spec_rows
from marginlab.bounds.domain import InputSet
from marginlab.bounds.graph import Graph
from marginlab.bounds.milp import Block, MilpProgram
from marginlab.estimators.mip_local import pgd, refine, spec_value

log = logging.getLogger(__name__)

VERIFY_TOL = 1e-4  # logits: SCIP's feasibility tolerances (1e-6 and 1e-8) times the big-M scale of a net
_SLACK = 1e-9  # relative: float rounding of rtol * hi must not keep a closed bracket open
_HINT = 1e-3  # relative: the first search looks this far beyond the attack's radius


@dataclass
class PointResult:
    """One point's exact margin or bracket (magnitudes; the estimator applies the sign rule).

    ``status``: ``"exact"`` (``upper - lower <= rtol * upper``), ``"time limit"`` (the bracket
    ``[lower, upper]`` is all that is known) or ``"unsolved"`` (no adversarial point found: ``upper`` is the
    attack's radius or ``inf``). ``delta [*in]`` (float64) is the closest perturbation found (``None`` if
    none), ``target`` the class it reaches (``y`` for a misclassified point), ``gap`` the value of its
    target's specification at ``x0 + delta`` (``>= -VERIFY_TOL`` when ``verified``), ``programs`` the
    number of SCIP runs and ``tests`` of radii tested.
    """

    status: str
    lower: float
    upper: float
    target: int
    delta: Tensor | None
    verified: bool
    gap: float
    seconds: float
    programs: int
    tests: int = 0


@dataclass(frozen=True)
class Setup:
    """What every point shares: the network (``graph``, its MILP ``blocks``, the float64 ``model`` for
    forward passes), the norm ``p``, the domain (``box``: [0,1]^d), ``time_limit`` seconds per point,
    ``rtol`` and the pyscipopt module. ``local``: PGD and region refinement (else SCIP alone finds the
    points); ``tuned``: the SCIP settings of :data:`marginlab.bounds.milp.TEST_PARAMS` (else SCIP's
    defaults); ``cuts``: the ideal ReLU cuts of :mod:`marginlab.bounds.milp_cuts` (off: measured, they
    cost more than they save on average). The variants measure what each part brings
    (``benchmarks/bench_mip_mnist.py``)."""

    graph: Graph
    blocks: list[Block]
    model: nn.Module
    p: float
    box: bool
    time_limit: float
    rtol: float
    scip: ModuleType
    local: bool = True
    tuned: bool = True
    cuts: bool = False


def targets_of(y: int, pred: int, num_classes: int) -> tuple[list[Tensor], list[int]]:
    """The targets ``[S,K]`` of a point (see :mod:`marginlab.estimators.mip_local`) and their classes."""
    eye = torch.eye(num_classes, dtype=torch.float64)
    if pred == y:
        classes = [k for k in range(num_classes) if k != y]
        return [(eye[k] - eye[y])[None] for k in classes], classes
    return [eye[y][None] - eye[[j for j in range(num_classes) if j != y]]], [y]


class _Search:
    """The state of one point's search (module doc): ``lo`` certified, ``hi`` the norm of the closest
    adversarial point found (``inf`` until one is), ``probe`` where to look for the first one."""

    def __init__(self, setup: Setup, x0: Tensor, specs: list[Tensor], lo: float, probe: float) -> None:
        self.s, self.x0, self.specs = setup, x0, specs
        self.lo, self.hi, self.probe = lo, math.inf, probe
        self.delta: Tensor | None = None
        self.target = -1
        self.start = time.perf_counter()
        self.programs = self.tests = 0
        self.tested: list[tuple[float, Bounds]] = []

    def left(self) -> float:
        """Seconds left of the point's time limit."""
        return self.s.time_limit - (time.perf_counter() - self.start)

    def accept(self, delta: Tensor, t: int) -> None:
        """A found adversarial point: refined in its region, then ``hi`` moves to its norm."""
        if self.s.local:
            delta = refine(self.s.model, self.s.graph, self.x0, delta, self.specs[t], self.s.p, self.s.box)
        norm = float(torch.linalg.vector_norm(delta, ord=self.s.p))
        if norm < self.hi:
            self.hi, self.delta, self.target = norm, delta, t

    def _bounds(self, inset: InputSet, eps: float) -> Bounds:
        larger = [b for e, b in self.tested if e >= eps]
        prior = larger[-1] if larger else None
        bounds = layer_bounds(self.s.graph, inset, prior=prior)
        self.tested.append((eps, bounds))
        self.tested.sort(key=lambda eb: -eb[0])
        return bounds

    def test(self, eps: float) -> str:
        """``"certified"`` (no adversarial point within ``eps``), ``"found"`` (``hi`` moved) or ``"open"``."""
        self.tests += 1
        flat = self.x0.flatten()
        inset = InputSet(flat[None], torch.tensor([eps], dtype=torch.float64), self.s.p, self.s.box)
        bounds = self._bounds(inset, eps)
        spec = -torch.cat(self.specs)[None]  # a target is out of reach when a row is negative on the ball
        a, d = spec_rows(self.s.graph, bounds, spec)
        low = (inset.concretize(a) + d)[0].split([len(c) for c in self.specs])
        # most promising first: the largest upper bound of min_r (C f)_r, at most -max_r low_r
        live = sorted((float(v.max()), t) for t, v in enumerate(low) if not bool((v > 0).any()))
        if not live:
            return "certified"
        order = [t for _, t in live]
        starts = [] if self.delta is None else [self.delta]
        found = None
        if self.s.local:
            found = pgd(
                self.s.model, self.x0, [self.specs[t] for t in order], eps, self.s.p, self.s.box, starts
            )
        if found is not None:
            self.accept(found[0], order[found[1]])
            return "found"
        for t in order:
            if self.left() <= 0:
                return "open"
            prog = MilpProgram(self.s.scip, self.s.blocks, bounds, self.x0, inset)
            prog.ball(self.s.p, eps)
            prog.maximize(self.specs[t], tuned=self.s.tuned, cuts=self.s.cuts)
            t0 = time.perf_counter()
            status, _, delta = prog.solve(self.left(), self.s.p)
            self.programs += 1
            log.debug(
                "radius %.6g target %d: %s in %.2f s (%d binaries, %d nodes)",
                eps, t, status, time.perf_counter() - t0, prog.binaries, prog.m.getNNodes(),
            )  # fmt: skip
            if status == "infeasible":
                continue
            if delta is not None and spec_value(self.s.model, self.x0, delta, self.specs[t]) >= -VERIFY_TOL:
                self.accept(delta, t)
                return "found"
            return "open"  # out of time (or a point the forward pass does not confirm)
        return "certified"

    def closed(self) -> bool:
        """Whether a point was found and ``hi - lo <= rtol * hi``."""
        return math.isfinite(self.hi) and self.hi - self.lo <= self.s.rtol * self.hi * (1 + _SLACK)

    def run(self, cover: float) -> None:
        """Tests radii until the bracket closes or the time runs out: first at ``probe``, doubling (up to
        ``cover``, the radius of a ball that holds the box) until a point is found, then below ``hi``."""
        misses = 0
        while not self.closed() and self.left() > 0:
            had = self.delta is not None
            if not had:
                eps = min(self.probe, cover)
            else:
                eps = self.hi * (1 - self.s.rtol) if misses < 2 else (self.lo + self.hi) / 2
            outcome = self.test(eps)
            if outcome == "open":
                return
            if outcome == "certified":
                self.lo, misses = max(self.lo, eps), 0
                if self.delta is None:
                    if eps >= cover:  # the ball holds the whole box: no adversarial point exists
                        self.lo = self.hi = math.inf
                        return
                    self.probe = 2 * eps
            elif had:
                misses += 1
            self.lo = min(self.lo, self.hi)  # a confirmed point below a certified radius: trust the point


def solve_point(setup: Setup, x0: Tensor, y: int, pred: int, lo: float, hint: float) -> PointResult:
    """Exact margin magnitude (or bracket) of one point ``x0 [*in]`` (float64) within ``setup.time_limit``.

    ``lo``: a certified radius (crown's, or 0); ``hint``: an attack's radius (``inf``: none), where the
    search looks first (a little above it: the attack's float32 point need not be adversarial in
    float64). Without one, in the box domain the search starts from the ball that holds the whole box;
    in R^d it gives up (``"unsolved"``).
    """
    specs, classes = targets_of(y, pred, setup.graph.num_classes)
    n = x0.numel()
    cover = 1.0 if setup.p == math.inf else math.sqrt(n) if setup.p == 2.0 else float(n)
    if not setup.box:
        cover = math.inf
    if not math.isfinite(hint) and not setup.box:
        return PointResult("unsolved", lo, math.inf, -1, None, False, math.nan, 0.0, 0)
    search = _Search(setup, x0, specs, lo, min(hint * (1 + _HINT), cover))
    search.run(cover)
    return _result(search, x0, specs, classes, hint)


def _result(search: _Search, x0: Tensor, specs: list[Tensor], classes: list[int], hint: float) -> PointResult:
    """The point's result from the final state of its search."""
    seconds = time.perf_counter() - search.start
    count = (seconds, search.programs, search.tests)
    if search.delta is None:
        if math.isinf(search.lo):  # certified on the whole box
            return PointResult("exact", math.inf, math.inf, -1, None, False, math.nan, *count)
        upper = hint if hint >= search.lo else math.inf  # the attack's radius, unless disproved
        return PointResult("unsolved", search.lo, upper, -1, None, False, math.nan, *count)
    gap = spec_value(search.s.model, x0, search.delta, specs[search.target])
    status = "exact" if search.closed() else "time limit"
    delta = search.delta.reshape(x0.shape)
    lo, hi = min(search.lo, search.hi), search.hi
    return PointResult(status, lo, hi, classes[search.target], delta, gap >= -VERIFY_TOL, gap, *count)
