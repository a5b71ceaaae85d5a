"""alpha-CROWN (Xu et al. 2021) for the final specification: optimised lower slopes of the unstable ReLUs.

CROWN relaxes an unstable ReLU ``l < z < u`` from below by ``relu(z) >= s z`` with ``s`` 0 or 1 (the
adaptive choice of :meth:`marginlab.bounds.ops.ReLU.relax`); every ``s`` in ``[0, 1]`` is as sound,
and the best one depends on the row being bounded. :func:`optimized_rows` gives every row of the
specification (per point and class) its own slopes ``alpha [B,S,*shape]`` for every ReLU node,
starts them at CROWN's choice (so the first step reproduces the CROWN bound) and takes ``steps``
Adam steps on the sum of the rows' lower bounds (autograd through the back-substitution), keeping per
row the best bound seen. The intermediate bounds stay fixed (those of
:func:`marginlab.bounds.crown.layer_bounds`): this is the cheap part of alpha-CROWN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.bounds.backsub import Bounds, Relaxations, input_rows, relaxations
from marginlab.bounds.domain import InputSet
from marginlab.bounds.graph import Graph

LR = 0.1  # Adam's step on the slopes (each in [0, 1])
DECAY = 0.98  # per step


def _optimize(
    graph: Graph, base: Relaxations, spec: Tensor, inset: InputSet, first: int, steps: int
) -> tuple[Tensor, Tensor]:
    """``(A [b,S,D], d [b,S])`` of the best slopes found for the points ``first .. first + b - 1``."""
    b, s = spec.shape[:2]
    pts = slice(first, first + b)
    unstable: dict[int, Tensor] = {}
    alpha: dict[int, Tensor] = {}
    for k, (low, _, bias) in base.relu.items():
        unstable[k] = (bias[pts] > 0)[:, None]  # the chord has an intercept exactly where unstable
        alpha[k] = low[pts][:, None].expand(b, s, *low.shape[1:]).clone().requires_grad_(True)
    opt = torch.optim.Adam(list(alpha.values()), lr=LR)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, DECAY)
    sub = InputSet(inset.x0[pts], inset.eps[pts], inset.p, inset.box)
    local = base.points(pts)
    dim = math.prod(graph.in_shape)
    best = torch.full((b, s), -math.inf, dtype=torch.float64)
    best_a, best_d = torch.zeros(b, s, dim, dtype=torch.float64), torch.zeros(b, s, dtype=torch.float64)
    for _ in range(steps):
        local.slopes = {
            k: torch.where(unstable[k], alpha[k].clamp(0, 1), local.relu[k][0][:, None]) for k in alpha
        }
        a, d = input_rows(graph, spec, local)
        bound = sub.concretize(a) + d
        with torch.no_grad():
            better = bound > best
            best = torch.where(better, bound, best)
            best_a = torch.where(better[..., None], a, best_a)
            best_d = torch.where(better, d, best_d)
        opt.zero_grad()
        (-bound.sum()).backward()
        opt.step()
        sched.step()
    return best_a, best_d


def optimized_rows(
    graph: Graph, bounds: Bounds, spec: Tensor, inset: InputSet, *, steps: int, crown_budget: int
) -> tuple[Tensor, Tensor]:
    """The specification ``spec [B,S,K]`` as linear bounds ``(A [B,S,D], d [B,S])`` of the input with
    alpha-CROWN's slopes (``steps`` Adam steps; module doc), valid wherever ``bounds`` hold; each row at
    least as tight over ``inset`` as CROWN's."""
    base = relaxations(graph, bounds)
    b, s = spec.shape[:2]
    per_point = s * 12 * max(t[0].numel() // max(1, b) for t in bounds.values()) if bounds else s
    n = max(1, crown_budget // max(1, per_point))
    with torch.enable_grad():
        parts = [_optimize(graph, base, spec[i : i + n], inset, i, steps) for i in range(0, b, n)]
    return torch.cat([a for a, _ in parts]), torch.cat([d for _, d in parts])
