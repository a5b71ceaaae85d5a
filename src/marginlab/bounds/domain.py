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

    def _dual_l2_box(self, a: Tensor, grid: int = 25) -> Tensor:
        """Weak duality for ``min a.x`` s.t. ``||x - x0||_2 <= eps``, ``0 <= x <= 1``: for every ``lam > 0``,
        ``g(lam) = min_{x in box} a.x + lam (||x - x0||^2 - eps^2)`` is a lower bound, and the inner
        minimum is separable (``x_i = clip(x0_i - a_i / (2 lam))``). A geometric grid of ``lam`` around
        the ball's own multiplier ``||a|| / (2 eps)`` gets close to the best one."""
        x0, eps = self.x0[:, None, :], self.eps[:, None]
        if not bool(torch.isfinite(eps).all()):
            return torch.full(a.shape[:2], -math.inf, dtype=a.dtype, device=a.device)
        base = a.norm(dim=2).clamp_min(1e-300) / (2 * eps.clamp_min(1e-300))
        best = torch.full(a.shape[:2], -math.inf, dtype=a.dtype, device=a.device)
        for k in torch.linspace(-6, 3, grid).tolist():
            lam = base * (2.0**k)
            x = (x0 - a / (2 * lam[..., None])).clamp(0.0, 1.0)
            g = (a * x).sum(2) + lam * ((x - x0).square().sum(2) - eps.square())
            best = torch.maximum(best, g)
        return best


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
