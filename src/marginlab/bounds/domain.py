"""The input sets of bound propagation, and the closed-form minimum of a linear function over them.

A margin is measured in a *domain*: ``"box"``, the image box [0,1]^d, or ``"rd"``, all of R^d
(:func:`parse_domain`). Bound propagation asks for the smallest value of a linear function ``a . x`` over

    X = {x : ||x - x0||_p <= eps}            (domain rd),   or   X ∩ [0,1]^d   (domain box),

for ``p`` in {2, inf} (:class:`InputSet`; another ``p <= 2`` gets the looser L2 formula, still sound).
The minimum, per point and specification row:

- a box ``lo <= x <= hi``: ``sum_i min(a_i lo_i, a_i hi_i)`` (each coordinate on its own; exact);
- a ball: ``a . x0 - eps ||a||_q`` with ``1/p + 1/q = 1`` (Hoelder; exact);
- the L-inf ball in the box is again a box (exact); the L2 ball in the box is not, and its minimum is
  bounded from below by the best of the ball's, the box's and the Lagrangian dual
  ``g(lam) = min_{x in box} a . x + lam (||x - x0||^2 - eps^2)``, ``lam > 0``, taken on a grid of ``lam``
  (weak duality: every ``g(lam)`` is a lower bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from marginlab.base.errors import ConfigError

DOMAINS = ("box", "rd")


def parse_domain(domain: str) -> str:
    """``"box"`` (the image box [0,1]^d, default for images) or ``"rd"`` (all of R^d; ``"R^d"`` too)."""
    text = str(domain).strip().lower().replace("^", "")
    if text not in DOMAINS:
        raise ConfigError(f"unknown margin domain {domain!r}; use 'box' ([0,1]^d) or 'rd' (R^d)")
    return text


@dataclass(frozen=True)
class InputSet:
    """``{x : ||x - x0||_p <= eps}``, intersected with [0,1]^d when ``box``. ``x0 [B,D]``, ``eps [B]``."""

    x0: Tensor
    eps: Tensor
    p: float
    box: bool

    def interval(self) -> tuple[Tensor, Tensor]:
        """Per-coordinate bounds ``(l, u)`` ``[B,D]``: ``|x_i - x0_i| <= ||x - x0||_p`` for every p."""
        e = self.eps[:, None]
        lo, hi = self.x0 - e, self.x0 + e
        if self.box:
            lo, hi = lo.clamp(0.0, 1.0), hi.clamp(0.0, 1.0)
        return lo, hi

    def concretize(self, a: Tensor) -> Tensor:
        """Lower bound ``[B,S]`` of ``a [B,S,D] . x`` over the set (exact unless ``box`` and ``p = 2``)."""
        lo, hi = self.interval()
        box_bound = _box_min(a, lo, hi)
        if self.p == math.inf:
            return box_bound  # the L-inf ball (and its intersection with the box) is a box
        ball = _ball_min(a, self.x0, self.eps, self.p)
        if not self.box:
            return ball
        return torch.maximum(torch.maximum(ball, box_bound), self._dual_l2_box(a))

    def _dual_l2_box(self, a: Tensor, iters: int = 4) -> Tensor:
        """``min a.x`` s.t. ``||x - x0||_2 <= eps``, ``0 <= x <= 1``, by Lagrangian duality: for every
        ``lam > 0``, ``g(lam) = min_{x in box} a.x + lam (||x - x0||^2 - eps^2)`` is a lower bound (weak
        duality), with the separable minimiser ``x_i = clip(x0_i - a_i t)``, ``t = 1 / (2 lam)``.

        The best ``lam`` makes ``F(s) = ||x(t) - x0||^2 = sum_i min(a_i^2 s, r_i^2)`` (``s = t^2``, ``r_i``
        the room to the box) equal ``eps^2``, and then ``g(lam)`` is the minimum itself (strong duality).
        ``F`` is concave and increasing in ``s``, so Newton's method from the ball's ``s`` (no
        coordinate clipped) climbs to the root from below and is exact once it has found which
        coordinates clip: ``iters`` steps in float32 (any ``lam`` is valid; only ``g`` needs float64).
        ``-inf`` where ``eps`` is 0 or infinite (the ball's or the box's own minimum is exact there)."""
        x0, eps = self.x0[:, None, :], self.eps[:, None]
        target = eps.float().square()
        sq = a.float().square()
        room = torch.where(a > 0, x0, 1 - x0).float().clamp_min(0).square()
        s = target / sq.sum(2).clamp_min(1e-30)
        for _ in range(iters):
            moved = sq * s[..., None]
            free = moved < room
            slope = (sq * free).sum(2)
            step = (target - torch.where(free, moved, room).sum(2)) / slope.clamp_min(1e-30)
            s = torch.where(slope > 0, s + step, s)
        usable = (s > 0) & torch.isfinite(s) & torch.isfinite(eps) & (eps > 0)
        lam = 1 / (2 * torch.where(usable, s, torch.ones_like(s)).double().sqrt())
        x = (x0 - a / (2 * lam[..., None])).clamp(0.0, 1.0)
        g = (a * x).sum(2) + lam * ((x - x0).square().sum(2) - eps.square())
        return torch.where(usable, g, torch.full_like(g, -math.inf))


def _box_min(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``min_{lo <= x <= hi} a . x`` -> ``[B,S]`` for ``a [B,S,D]``, ``lo, hi [B,D]``."""
    return (a.clamp(min=0) * lo[:, None, :] + a.clamp(max=0) * hi[:, None, :]).sum(2)


def _ball_min(a: Tensor, x0: Tensor, eps: Tensor, p: float) -> Tensor:
    """``min_{||x - x0||_p <= eps} a . x = a . x0 - eps ||a||_q`` -> ``[B,S]`` (Hoelder) for ``a [B,S,D]``,
    ``x0 [B,D]``, ``eps [B]``. ``q = 1`` for ``p = inf``, else ``q = 2``: exact for ``p = 2``, and still a
    lower bound for ``p < 2`` (the MILP's ``p = 1``), where ``||a||_2 >= ||a||_q``."""
    q = 1.0 if p == math.inf else 2.0
    norm = torch.linalg.vector_norm(a, ord=q, dim=2)
    radius = torch.where(norm > 0, eps[:, None] * norm, torch.zeros_like(norm))  # inf * 0 -> 0
    return (a * x0[:, None, :]).sum(2) - radius


def largest_radius(
    a: Tensor, d: Tensor, x0: Tensor, *, p: float, box: bool, hi: Tensor, every: Tensor, steps: int = 30
) -> Tensor:
    """The largest radius ``r <= hi`` ``[B]`` at which fixed linear bounds ``a [B,S,D] . x + d [B,S]``
    stay positive on the set of radius ``r`` around ``x0 [B,D]``: on every row (``every [B]`` true) or on
    at least one; 0 where none is.

    The bounds of a row over a set of radius ``r`` decrease with ``r`` (the sets are nested). In R^d
    the row's radius is ``(a . x0 + d) / ||a||_q`` (Hoelder), taken a hair smaller so that the bound
    is positive; in the box, ``steps`` halvings of ``[0, hi]`` (certified end kept).
    """
    b, s = d.shape
    if not box:
        center = (a * x0[:, None]).sum(2) + d
        norm = torch.linalg.vector_norm(a, ord=1.0 if p == math.inf else 2.0, dim=2)
        each = torch.where(
            norm > 0, center / norm.clamp_min(1e-300) * (1 - 1e-9), torch.full_like(d, math.inf)
        )
        each = torch.where(center > 0, each, torch.zeros_like(d))
        each = torch.minimum(each, hi[:, None].expand(b, s))
    else:
        flat = InputSet(x0.repeat_interleave(s, 0), torch.zeros(b * s, dtype=d.dtype), p, box)

        def positive(r: Tensor) -> Tensor:
            at = InputSet(flat.x0, r.flatten(), p, box)
            return (at.concretize(a.reshape(b * s, 1, -1))[:, 0] + d.flatten() > 0).reshape(b, s)

        high = hi[:, None].expand(b, s).clone()
        ok_top = positive(high)
        low = torch.where(ok_top, high, torch.zeros_like(high))
        alive = ~ok_top & positive(low)  # certified at radius 0 (the point itself), not at hi
        for _ in range(steps if bool(alive.any()) else 0):
            mid = (low + high) / 2
            ok = positive(mid) & alive
            low = torch.where(ok, mid, low)
            high = torch.where(alive & ~ok, mid, high)
        each = torch.where(ok_top | alive, low, torch.zeros_like(low))
    return torch.where(every, each.amin(1), each.amax(1))
