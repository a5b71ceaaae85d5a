"""Local searches of the exact margin (:mod:`marginlab.estimators.mip`): they find adversarial points fast,
so that SCIP is left with what only it can do, proving that a ball holds none.

A *target* is a specification ``C [S,K]`` of the logits ``f``: a point is adversarial for it when every
row is non-negative, ``min_r (C f)_r >= 0`` (a correctly classified point: one row ``e_k - e_y`` per other
class ``k``; a misclassified one: the rows ``e_y - e_j`` for every ``j != y``, i.e. back into the
region of ``y``).

- :func:`spec_value`: ``min_r (C f(x0 + delta))_r`` by a forward pass of the float64 model (the check
  every reported perturbation passes);
- :func:`pgd`: projected gradient ascent of that value over the ball of radius ``eps`` (inside the
  box when asked), batched over targets and starting points; ``p = 1`` has none (``None``);
- :func:`refine`: the closest point to ``x0`` in the linear region of a found adversarial point
  (:func:`marginlab.bounds.region.closest_in_region`), kept when the forward pass confirms it and it is
  closer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marginlab.bounds.graph import Graph
from marginlab.bounds.region import closest_in_region, linear_region

PGD_STEPS = 40
TAU = 1e-7  # logits: the region program asks for this much, so rounding cannot undo the crossing


def spec_value(model: nn.Module, x0: Tensor, delta: Tensor, spec: Tensor) -> float:
    """``min_r (spec f(x0 + delta))_r`` for ``x0 [*in]``, ``delta [D]`` (float64) and ``spec [S,K]``."""
    with torch.no_grad():
        logits = model((x0 + delta.reshape(x0.shape))[None])[0]
    return float((spec @ logits).min())


def _project(d: Tensor, x0: Tensor, eps: float, p: float, box: bool) -> Tensor:
    """``d [n,D]`` into the ball of radius ``eps`` (and, with ``box``, ``x0 + d`` into [0,1]^D); for
    ``p = 2`` the box clip after the ball's scaling only moves coordinates toward ``x0``, so it stays in."""
    if p == math.inf:
        d = d.clamp(-eps, eps)
    else:
        norm = d.norm(dim=1, keepdim=True)
        d = d * torch.where(norm > eps, eps / norm.clamp_min(1e-300), torch.ones_like(norm))
    if box:
        d = (x0 + d).clamp(0.0, 1.0) - x0
    return d


def pgd(
    model: nn.Module,
    x0: Tensor,
    specs: Sequence[Tensor],
    eps: float,
    p: float,
    box: bool,
    starts: Sequence[Tensor],
) -> tuple[Tensor, int] | None:
    """An adversarial ``(delta [D], target index)`` within ``||delta||_p <= eps`` (float64, verified by the
    forward pass: ``spec_value > 0``), or ``None``. ``specs``: the targets, each ``[S,K]`` with one
    ``S``; ``starts``: perturbations ``[D]`` to start from besides 0 (projected first). Sign steps for
    ``p = inf``, normalised gradient steps for ``p = 2``, decaying by 7% a step from ``eps / 4`` (the start
    at 0) or ``eps / 50`` (the others: points found before, which lie near the boundary)."""
    if p not in (2.0, math.inf) or not specs or not eps > 0:
        return None
    flat = x0.flatten()
    spec = torch.stack(list(specs))  # [T,S,K]
    n_t, n_s = len(spec), len(starts) + 1
    d = torch.zeros(n_s * n_t, len(flat), dtype=torch.float64)
    for i, s in enumerate(starts):
        d[(i + 1) * n_t : (i + 2) * n_t] = s.flatten()
    spec_all = spec.repeat(n_s, 1, 1)
    d = _project(d, flat, eps, p, box)
    step = torch.full((len(d), 1), eps / 50, dtype=torch.float64)
    step[:n_t] = eps / 4
    for _ in range(PGD_STEPS + 1):
        d.requires_grad_(True)
        with torch.enable_grad():
            logits = model((flat + d).reshape(len(d), *x0.shape))
            value = torch.einsum("nsk,nk->ns", spec_all, logits).min(dim=1).values
            grad = torch.autograd.grad(value.sum(), d)[0] if not bool((value > 0).any()) else None
        if grad is None:
            i = int((value > 0).nonzero()[0, 0])
            return d[i].detach().clone(), i % n_t
        move = grad.sign() if p == math.inf else grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-300)
        d = _project(d.detach() + step * move, flat, eps, p, box)
        step *= 0.93
    return None


def refine(
    model: nn.Module,
    graph: Graph,
    x0: Tensor,
    delta: Tensor,
    spec: Tensor,
    p: float,
    box: bool,
) -> Tensor:
    """``delta [D]`` (adversarial for the target ``spec [S,K]``), or the closest adversarial point of its
    linear region when the forward pass confirms that one (value > 0) and it is closer (float64)."""
    flat = x0.flatten().double()
    region = linear_region(graph, flat + delta)
    lo, hi = (torch.zeros_like(flat), torch.ones_like(flat)) if box else (flat - math.inf, flat + math.inf)
    best = closest_in_region(region, flat, spec, p, lo, hi, tau=TAU)
    if best is None:
        return delta
    ord_ = float(p)
    if spec_value(model, x0, best, spec) > 0 and float(torch.linalg.vector_norm(best, ord=ord_)) < float(
        torch.linalg.vector_norm(delta, ord=ord_)
    ):
        return best
    return delta
