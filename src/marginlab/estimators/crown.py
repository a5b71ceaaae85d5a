"""``crown``: a certified lower bound of the margin by linear bound propagation and bisection on the radius.

For a point ``x`` predicted as its label ``y``, the radius ``eps`` is *certified* when the bound
propagation of :mod:`marginlab.bounds.crown` proves ``min_{k != y} (f_y - f_k)(x') > 0`` for every ``x'``
in the ball ``||x' - x||_p <= eps`` (intersected with the image box [0,1]^d in the ``box`` domain). The
certified radii form an interval ``[0, r]`` (bounds over a smaller set are never looser), so bisection
finds ``r`` to relative precision ``rtol`` from below, batched over the points of a batch:

    margin >= r >= lo,   reported: r rounded down to the bisection grid (never above the true margin).

Misclassified points (sign rule of :mod:`marginlab.estimators.base`): the radius is certified when one
class ``k`` provably beats ``y`` on the whole ball (``f_k - f_y > 0``), so no point of the ball lies in
the region of ``y``; the value is minus that radius, whose magnitude is a lower bound of the distance
into the region of ``y``.

Warm start: the global Lipschitz bound (``estimators/lipschitz.py``, also certified) is the initial
lower end of the bracket when ``warm_start`` (then the result is never below it); the upper end doubles
until it is no longer certified. In the ``box`` domain a certified ball that covers the whole box means
no adversarial image exists at all: the margin is ``+inf``. On linear models in the ``rd`` domain the
bound is exact, so the result is the exact margin up to ``rtol``.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.crown import CROWN_BUDGET, lower_bounds, margin_spec
from marginlab.bounds.domain import parse_domain
from marginlab.bounds.network import network_ops
from marginlab.bounds.ops import Op
from marginlab.estimators.base import Estimator, MarginKind, build_estimator, register


def certified(
    ops: Sequence[Op],
    x: torch.Tensor,
    y: torch.Tensor,
    sign: torch.Tensor,
    eps: torch.Tensor,
    *,
    p: float,
    box: bool,
    crown_budget: int,
) -> torch.Tensor:
    """``[B]`` bool: is the ball of radius ``eps [B]`` around ``x [B,*in]`` certified (see module doc)?"""
    num_classes = ops[-1].out_shape[0]
    spec = margin_spec(y, num_classes, sign)
    low = lower_bounds(ops, x, eps, spec, p=p, box=box, crown_budget=crown_budget)
    return torch.where(sign > 0, low.min(dim=1).values > 0, low.max(dim=1).values > 0)


def certified_radius(
    ops: Sequence[Op],
    x: torch.Tensor,
    y: torch.Tensor,
    sign: torch.Tensor,
    *,
    p: float,
    box: bool,
    lo: torch.Tensor | None = None,
    rtol: float = 1e-4,
    crown_budget: int = CROWN_BUDGET,
) -> torch.Tensor:
    """Largest certified radius ``[B]`` (float64) of ``x [B,*in]`` by bracketing and bisection.

    ``sign [B]``: +1 for correctly classified points, -1 otherwise; ``lo [B]``: radii already known
    to be certified (default 0). ``+inf`` where the ball covering the whole box is certified (box domain).
    """
    x = x.double()
    b = len(x)
    lo = torch.zeros(b, dtype=torch.float64) if lo is None else lo.double().clamp_min(0).clone()
    # The box [0,1]^d lies in every ball of this radius around a point of the box.
    cover = 1.0 if p == math.inf else math.sqrt(x[0].numel())

    def check(idx: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return certified(ops, x[idx], y[idx], sign[idx], eps, p=p, box=box, crown_budget=crown_budget)

    hi = torch.where(lo > 0, 2 * lo, torch.full_like(lo, cover / 64))
    if box:
        hi = hi.clamp(max=cover)
    grow = torch.ones(b, dtype=torch.bool)
    for _ in range(60):  # 60 doublings: radii up to ~1e18 times the start
        idx = grow.nonzero()[:, 0]
        if len(idx) == 0:
            break
        ok = check(idx, hi[idx])
        lo[idx[ok]] = hi[idx[ok]]
        grow[idx[~ok]] = False
        if box:  # certified with the whole box inside the ball: nothing adversarial in the domain
            whole = idx[ok][hi[idx[ok]] >= cover]
            lo[whole], hi[whole], grow[whole] = math.inf, math.inf, False
        hi[grow] = 2 * hi[grow] if not box else (2 * hi[grow]).clamp(max=cover)
    lo[grow] = math.inf  # still certified after every doubling (a network constant on the ray)
    while True:
        idx = (torch.isfinite(hi) & (hi - lo > rtol * hi)).nonzero()[:, 0]
        if len(idx) == 0:
            return lo
        mid = (lo[idx] + hi[idx]) / 2
        ok = check(idx, mid)
        lo[idx[ok]] = mid[ok]
        hi[idx[~ok]] = mid[~ok]


@register("crown")
@dataclass(kw_only=True)
class Crown(Estimator):
    """Certified lower bound: the largest radius that bound propagation certifies (see the module doc).

    ``domain``: ``"box"`` ([0,1]^d, default) or ``"rd"``; ``rtol``: bisection precision;
    ``crown_budget``: a layer gets backward-propagated bounds when its neurons times the widest layer
    below it is at most this (else interval bounds; see :mod:`marginlab.bounds.crown`);
    ``warm_start``: start from the Lipschitz bound.
    """

    kind = MarginKind.LOWER
    needs = frozenset({"layers"})
    batch_size: int = 64
    domain: str = "box"
    rtol: float = 1e-4
    crown_budget: int = CROWN_BUDGET
    warm_start: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.domain = parse_domain(self.domain)
        if not 0 < self.rtol < 1:
            raise ConfigError(f"crown: rtol must be in (0, 1), got {self.rtol}")

    def _prepare(self, model: nn.Module, x1: torch.Tensor, p: float) -> None:
        self._ops = network_ops(model, tuple(x1.shape[1:]))

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        with torch.no_grad():
            correct = model(x).argmax(dim=1) == y
        sign = correct.double() * 2 - 1
        lo = None
        if self.warm_start:
            try:
                lo = build_estimator("lipschitz", batch_size=len(x))(model, x, y, p=p).abs()
            except ConfigError:  # layers the Lipschitz bound does not cover (e.g. average pooling)
                lo = None
        radius = certified_radius(
            self._ops,
            x.cpu(),
            y.cpu(),
            sign.cpu(),
            p=p,
            box=self.domain == "box",
            lo=lo,
            rtol=self.rtol,
            crown_budget=self.crown_budget,
        )
        return torch.where(correct.cpu(), radius, -radius)
