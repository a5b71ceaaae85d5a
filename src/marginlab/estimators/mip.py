"""``mip``: the exact margin of a small ReLU network as a mixed-integer program solved by SCIP.

For a point ``x0`` predicted as its label ``y`` and each other class ``k`` the program is

    min ||delta||_p   s.t.   f_k(x0 + delta) >= f_y(x0 + delta),   x0 + delta in the domain,

and the margin is the minimum over ``k``. The network becomes a MILP (``p = inf``, ``p = 1``) or an MIQP
(``p = 2``) by the big-M encoding of :mod:`marginlab.bounds.milp`; its pre-activation bounds ``l, u`` come
from :mod:`marginlab.bounds.crown` over the ball whose radius is the best perturbation found so far:
tight bounds are what makes the programs fast. Every program is cut off at that radius (a class that
cannot beat ``y`` closer than the best so far is infeasible, or pruned by the bound propagation before
SCIP runs), and classes are tried in order of their logit gap, closest first. A misclassified point gets
one program: the smallest ``delta`` with ``f_y >= f_j`` for all ``j`` (the distance *into* the region of
``y``, reported negative by the sign rule of :mod:`marginlab.estimators.base`).

Per point, within ``time_limit`` seconds for all its programs, the result is a :class:`PointResult`:
``status`` ``"exact"`` (every program closed: ``lower == upper``), ``"time limit"`` (the bracket
``[lower, upper]`` from SCIP's dual bounds and the best solution; the lower end is raised to the
crown certified radius where that is higher) or ``"unsolved"`` (no perturbation found within the
initial radius; ``upper`` is then that radius, or ``inf``). In the box domain, when no attack found
anything and no program is feasible on the whole box, the status is ``"exact"`` with ``upper = inf``
(no adversarial image exists). The perturbation found is
checked by a forward pass in float64 (``verified``: the target logit is within ``VERIFY_TOL`` of
beating ``y``, or beats it). The estimator returns the signed ``upper`` of every point (exact where the
status says so); ``Mip.last_details`` holds the :class:`PointResult` of every point of the last call.

The initial radius is the perturbation norm of a minimum-norm attack (``upper``, default DeepFool),
which lies in the box, so it bounds the margin in both domains. Needs the optional extra
``marginlab[exact]`` (``pyscipopt``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.crown import layer_bounds, lower_bounds, margin_spec
from marginlab.bounds.domain import InputSet, parse_domain
from marginlab.bounds.milp import Block, MilpProgram, network_blocks
from marginlab.bounds.network import network_ops
from marginlab.bounds.ops import Op
from marginlab.estimators.base import Estimator, MarginKind, build_estimator, register
from marginlab.estimators.crown import certified_radius

VERIFY_TOL = 1e-4  # logits: SCIP's feasibility tolerances (1e-6 and 1e-8) times the big-M scale of a net
_SLACK = 1e-6  # relative: an attack's radius is cut off a little above, so its own solution stays feasible


def require_scip() -> ModuleType:
    """``pyscipopt``, or a one-line ConfigError naming the extra that installs it."""
    try:
        import pyscipopt
    except ImportError:
        raise ConfigError(
            "the mip estimator needs SCIP: pip install 'marginlab[exact]' (pyscipopt)"
        ) from None
    return pyscipopt


@dataclass
class PointResult:
    """One point's exact margin or bracket (magnitudes; the estimator applies the sign rule).

    ``delta [*in]`` (float64) is the perturbation found (``None`` if none), ``target`` the class it
    reaches (``y`` for a misclassified point), ``gap`` = ``f_target - f_other`` at ``x0 + delta``
    (``>= -VERIFY_TOL`` when ``verified``), ``programs`` the number of SCIP runs.
    """

    status: str
    lower: float
    upper: float
    target: int
    delta: torch.Tensor | None
    verified: bool
    gap: float
    seconds: float
    programs: int


@dataclass(frozen=True)
class _Setup:
    """What every point's programs share: the network's ops and MILP blocks, the norm, the domain
    (``box``: [0,1]^d) and the time limit per point in seconds."""

    ops: Sequence[Op]
    blocks: list[Block]
    p: float
    box: bool
    time_limit: float


def _verify(model: nn.Module, x0: torch.Tensor, delta: torch.Tensor, y: int, target: int | None) -> float:
    """``f_target - f_y`` at ``x0 + delta`` (misclassified point: ``f_y - max_{j != y} f_j``), float64."""
    with torch.no_grad():
        logits = model((x0 + delta.reshape(x0.shape))[None])[0]
    if target is None:
        return float(logits[y] - logits.scatter(0, torch.tensor([y]), -math.inf).max())
    return float(logits[target] - logits[y])


def solve_point(
    model: nn.Module, setup: _Setup, x0: torch.Tensor, y: int, pred: int, radius: float
) -> PointResult:
    """Exact margin magnitude (or bracket) of one point ``x0 [*in]`` (float64) within ``setup.time_limit``.

    ``model`` is the float64 network used to verify; ``radius`` a known upper bound (``inf``: none).
    """
    scip = require_scip()
    start = time.perf_counter()
    p, box = setup.p, setup.box
    covers = False  # the ball holds the whole box: nothing found in it means no adversarial exists
    if not math.isfinite(radius):
        if not box:
            return PointResult("unsolved", 0.0, math.inf, -1, None, False, math.nan, 0.0, 0)
        radius = 1.0 if p == math.inf else math.sqrt(x0.numel()) if p == 2.0 else float(x0.numel())
        covers = True
    with torch.no_grad():
        logits = model(x0[None])[0]
    correct = pred == y
    targets: list[int | None] = (
        sorted((k for k in range(len(logits)) if k != y), key=lambda k: float(logits[y] - logits[k]))
        if correct
        else [None]
    )
    best, best_delta, best_target, best_gap = radius * (1 + _SLACK), None, -1, math.nan
    lowers: list[float] = []
    programs = 0
    for k in targets:
        inset = InputSet(x0.flatten()[None], torch.tensor([best], dtype=torch.float64), p, box)
        bounds = layer_bounds(setup.ops, inset, crown_budget=1 << 62)
        if k is not None:  # prune a class that provably cannot beat y within the best radius
            spec = margin_spec(torch.tensor([y]), len(logits), torch.ones(1))[:, [k - (k > y)]]
            if bool(lower_bounds(setup.ops, x0[None], inset.eps, spec, p=p, box=box)[0, 0] > 0):
                lowers.append(best)
                continue
        prog = MilpProgram(scip, setup.blocks, bounds, x0, inset)
        if k is not None:
            gaps = [prog.logit_gap(k, y)]
        else:  # into the region of y: f_y >= f_j for every j
            gaps = [-prog.logit_gap(j, y) for j in range(len(logits)) if j != y]
        for g in gaps:
            prog.m.addCons(g >= 0)
        prog.objective(p, best)
        status, dual, delta = prog.solve(setup.time_limit - (time.perf_counter() - start), p)
        programs += 1
        if delta is not None:
            norm = float(torch.linalg.vector_norm(delta, ord=p))
            if norm < best or best_delta is None:
                best, best_delta, best_target = norm, delta, (y if k is None else k)
                best_gap = _verify(model, x0, delta, y, k)
        dual_norm = math.sqrt(max(dual, 0.0)) if p == 2.0 and math.isfinite(dual) else dual
        lowers.append(best if status in ("optimal", "infeasible") else min(dual_norm, best))
        if status not in ("optimal", "infeasible") and time.perf_counter() - start >= setup.time_limit:
            lowers.extend([0.0] * (len(targets) - len(lowers)))  # targets never tried: nothing known
            break
    lower = min([best, *lowers])
    seconds = time.perf_counter() - start
    if best_delta is None:
        if covers and lower >= best:  # every program infeasible on the whole box
            return PointResult("exact", math.inf, math.inf, -1, None, False, math.nan, seconds, programs)
        return PointResult("unsolved", lower, radius, -1, None, False, math.nan, seconds, programs)
    closed = lower >= best * (1 - 1e-6)
    status = "exact" if closed else "time limit"
    verified = best_gap >= -VERIFY_TOL
    delta = best_delta.reshape(x0.shape)
    return PointResult(status, lower, best, best_target, delta, verified, best_gap, seconds, programs)


@register("mip")
@dataclass(kw_only=True)
class Mip(Estimator):
    """Exact margins by SCIP (see the module doc); ``last_details``: one :class:`PointResult` per point.

    ``domain``: ``"box"`` (default) or ``"rd"``; ``time_limit``: seconds per point; ``upper``: the
    minimum-norm attack giving the initial radius (an upper-bound estimator name).
    """

    kind = MarginKind.EXACT
    needs = frozenset({"layers"})
    batch_size: int = 16
    domain: str = "box"
    time_limit: float = 60.0
    upper: str = "deepfool"
    last_details: list[PointResult] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.domain = parse_domain(self.domain)
        if not self.time_limit > 0:
            raise ConfigError(f"mip: time_limit must be positive seconds, got {self.time_limit}")
        require_scip()

    def _prepare(self, model: nn.Module, x1: torch.Tensor, p: float) -> None:
        ops = network_ops(model, tuple(x1.shape[1:]))
        self._setup = _Setup(ops, network_blocks(ops), p, self.domain == "box", self.time_limit)
        self._model64 = _float64_copy(model)
        self.last_details = []

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        with torch.no_grad():
            pred = model(x).argmax(dim=1).cpu()
        radius = build_estimator(self.upper, batch_size=len(x))(model, x, y, p=p).abs()
        xc, yc = x.detach().cpu().double(), y.cpu()
        results = [
            solve_point(self._model64, self._setup, xc[i], int(yc[i]), int(pred[i]), float(radius[i]))
            for i in range(len(x))
        ]
        _raise_lower_ends(self._setup, xc, yc, pred, results)
        self.last_details.extend(results)
        upper = torch.tensor([r.upper for r in results], dtype=torch.float64)
        return torch.where(pred == yc, upper, -upper)


def _raise_lower_ends(
    setup: _Setup, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, results: list[PointResult]
) -> None:
    """Unclosed points: the lower end becomes at least the crown certified radius (classes SCIP never
    reached within the time limit would otherwise leave it at 0)."""
    weak = [i for i, r in enumerate(results) if r.status != "exact"]
    if not weak:
        return
    sign = (pred[weak] == y[weak]).double() * 2 - 1
    lo = torch.tensor([results[i].lower for i in weak], dtype=torch.float64)
    radius = certified_radius(setup.ops, x[weak], y[weak], sign, p=setup.p, box=setup.box, lo=lo, rtol=1e-3)
    for i, r in zip(weak, radius.tolist(), strict=True):
        results[i].lower = min(max(results[i].lower, r), results[i].upper)


def _float64_copy(model: nn.Module) -> nn.Module:
    """A CPU float64 copy for verification (the float32 model could flip a tie the solver resolved)."""
    return copy.deepcopy(model).to("cpu", torch.float64).eval()
