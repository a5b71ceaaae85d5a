"""``mip``: the exact margin of a small ReLU network as a mixed-integer program solved by SCIP.

For a point ``x0`` predicted as its label ``y`` and each other class ``k`` the program is

    min ||delta||_p   s.t.   f_k(x0 + delta) >= f_y(x0 + delta),   x0 + delta in the domain,

and the margin is the minimum over ``k``. Every ReLU ``a = max(z, 0)`` with pre-activation bounds
``l < 0 < u`` becomes the big-M encoding with one binary ``b``: ``a >= z, a >= 0, a <= z - l (1 - b),
a <= u b`` (stable neurons stay linear); max-pooling uses one binary per window entry. ``p = inf`` and
``p = 1`` give MILPs, ``p = 2`` an MIQP (``||delta||_2^2 <= t``, minimise ``t``). The bounds ``l, u``
come from :mod:`marginlab.bounds` over the ball whose radius is the best perturbation found so far:
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

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from marginlab.bounds import (
    Affine,
    InputSet,
    MaxPool,
    Op,
    ReLU,
    layer_bounds,
    lower_bounds,
    margin_spec,
    network_ops,
    parse_domain,
)
from marginlab.errors import ConfigError
from marginlab.estimators.base import Estimator, MarginKind, build_estimator, register

VERIFY_TOL = 1e-4  # logits: SCIP's feasibility tolerances (1e-6 and 1e-8) times the big-M scale of a net
_SLACK = 1e-6  # relative: an attack's radius is cut off a little above, so its own solution stays feasible


def require_scip() -> Any:
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


def _affine_matrix(block: Sequence[Affine]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M [out,in], c [out])`` of a chain of affine ops (float64), by applying it to the identity."""
    n_in = math.prod(block[0].in_shape)
    h = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *block[0].in_shape)
    c = torch.zeros(1, *block[0].in_shape, dtype=torch.float64)
    for op in block:
        h, c = op.lin(h), op.forward(c)
    return h.reshape(n_in, -1).T.contiguous(), c.flatten()


def _blocks(ops: Sequence[Op]) -> list[tuple[str, Any, int]]:
    """Merge consecutive affine ops: ``[("affine", (M, c), first op index) | ("relu"/"pool", op, index)]``."""
    out: list[tuple[str, Any, int]] = []
    run: list[Affine] = []
    for i, op in enumerate([*ops, None]):
        if isinstance(op, Affine):
            run.append(op)
            continue
        if run:
            out.append(("affine", _affine_matrix(run), i - len(run)))
            run = []
        if op is not None:
            out.append(("relu" if isinstance(op, ReLU) else "pool", op, i))
    return out


class _Program:
    """One SCIP model: the network on ``x0 + delta`` with the bounds of a given radius."""

    def __init__(self, scip: Any, blocks: list, bounds: dict, x0: torch.Tensor, inset: InputSet) -> None:
        self.m = scip.Model()
        self.m.hideOutput()
        self.m.setParam("randomization/randomseedshift", 0)
        self.scip = scip
        lo, hi = (t[0].tolist() for t in inset.interval())
        x = x0.flatten().tolist()
        self.delta = [self.m.addVar(lb=l - xi, ub=u - xi) for l, u, xi in zip(lo, hi, x, strict=True)]
        h: list[Any] = [xi + d for xi, d in zip(x, self.delta, strict=True)]
        for kind, item, i in blocks[:-1]:
            if kind == "affine":
                h = self._affine(h, *item)
            elif kind == "relu":
                h = self._relu(h, *(t[0].flatten().tolist() for t in bounds[i]))
            else:
                h = self._pool(h, item, bounds[i])
        self.features = h
        self.head = blocks[-1][1]

    def _affine(self, h: list[Any], m: torch.Tensor, c: torch.Tensor) -> list[Any]:
        return [self._dot(row, h) + float(cj) for row, cj in zip(m, c, strict=True)]

    def _dot(self, row: torch.Tensor, h: list[Any]) -> Any:
        nz = row.nonzero()[:, 0].tolist()
        values = row.tolist()
        return self.scip.quicksum(values[i] * h[i] for i in nz if not isinstance(h[i], float) or h[i] != 0.0)

    def _relu(self, z: list[Any], lo: list[float], hi: list[float]) -> list[Any]:
        out: list[Any] = []
        for zj, l, u in zip(z, lo, hi, strict=True):
            if u <= 0:
                out.append(0.0)
                continue
            v = self.m.addVar(lb=l, ub=u)
            self.m.addCons(v == zj)
            if l >= 0:
                out.append(v)
                continue
            a = self.m.addVar(lb=0.0, ub=u)
            b = self.m.addVar(vtype="B")
            self.m.addCons(a >= v)
            self.m.addCons(a <= v - l * (1 - b))
            self.m.addCons(a <= u * b)
            out.append(a)
        return out

    def _pool(self, h: list[Any], op: MaxPool, bounds: tuple[torch.Tensor, torch.Tensor]) -> list[Any]:
        index = torch.arange(math.prod(op.in_shape), dtype=torch.float64).reshape(1, *op.in_shape)
        win = op.windows(index)[0].long()  # [C,kk,L]: flat input index of every window entry
        lw, uw = (op.windows(t)[0] for t in bounds)
        out: list[Any] = []
        for c in range(win.shape[0]):
            for w in range(win.shape[2]):
                ids, lows, ups = win[c, :, w].tolist(), lw[c, :, w].tolist(), uw[c, :, w].tolist()
                best_low = max(lows)
                live = [j for j in range(len(ids)) if ups[j] >= best_low]  # others are never the max
                if len(live) == 1:
                    out.append(h[ids[live[0]]])
                    continue
                top = max(ups[j] for j in live)
                a = self.m.addVar(lb=best_low, ub=top)
                bs = [self.m.addVar(vtype="B") for _ in live]
                for j, b in zip(live, bs, strict=True):
                    self.m.addCons(a >= h[ids[j]])
                    self.m.addCons(a <= h[ids[j]] + (top - lows[j]) * (1 - b))
                self.m.addCons(self.scip.quicksum(bs) == 1)
                out.append(a)
        return out

    def logit_gap(self, k: int, y: int) -> Any:
        """Expression of ``f_k - f_y``."""
        m, c = self.head
        return self._dot(m[k] - m[y], self.features) + float(c[k] - c[y])

    def objective(self, p: float, cutoff: float) -> None:
        """Minimise ``||delta||_p`` (``p = 2``: its square) below ``cutoff`` (a norm)."""
        if p == math.inf:
            t = self.m.addVar(lb=0.0, ub=cutoff)
            for d in self.delta:
                self.m.addCons(t >= d)
                self.m.addCons(t >= -d)
            self.m.setObjective(t)
        elif p == 1.0:
            s = [self.m.addVar(lb=0.0) for _ in self.delta]
            for si, d in zip(s, self.delta, strict=True):
                self.m.addCons(si >= d)
                self.m.addCons(si >= -d)
            self.m.addCons(self.scip.quicksum(s) <= cutoff)
            self.m.setObjective(self.scip.quicksum(s))
        else:
            t = self.m.addVar(lb=0.0, ub=cutoff**2)
            self.m.addCons(self.scip.quicksum(d * d for d in self.delta) <= t)
            self.m.setObjective(t)

    def solve(self, seconds: float, p: float) -> tuple[str, float, torch.Tensor | None]:
        """``(status, dual bound as a norm, delta or None)`` after at most ``seconds``."""
        self.m.setParam("limits/time", max(seconds, 0.01))
        if p != 2.0:
            # Tighter than SCIP's 1e-6 for the MILPs: a nearly-integral big-M binary leaks l * tol into a
            # ReLU. (For the MIQP it makes the quadratic constraint very slow to enforce: default there.)
            self.m.setParam("numerics/feastol", 1e-8)
        self.m.optimize()
        status = self.m.getStatus()
        delta = None
        if self.m.getNSols() > 0:
            sol = self.m.getBestSol()
            delta = torch.tensor([self.m.getSolVal(sol, d) for d in self.delta], dtype=torch.float64)
        dual = self.m.getDualbound() if status != "infeasible" else math.inf
        return status, dual, delta


@dataclass(frozen=True)
class _Setup:
    ops: Sequence[Op]
    blocks: list
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
        prog = _Program(scip, setup.blocks, bounds, x0, inset)
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
        self._setup = _Setup(ops, _blocks(ops), p, self.domain == "box", self.time_limit)
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
    from marginlab.estimators.crown import certified_radius

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
    import copy

    return copy.deepcopy(model).to("cpu", torch.float64).eval()
