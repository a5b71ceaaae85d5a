"""Exact margins of linear classifiers over the image box [0,1]^d (closed forms, p = 1, 2, inf).

:mod:`marginlab.core.linear` measures distances in all of R^d. An image stays in the box, and so does
every perturbed image this module considers: for a point ``x`` in [0,1]^d and a class pair (y, k) with
``g_k(x) = (w_y - w_k) . x + b_y - b_k``, the distance to the other side of the pairwise boundary is

    d_k(x) = min ||delta||_p   s.t.   a . delta >= c,   0 <= x + delta <= 1,            (*)

with ``a = -sign(g_k) (w_y - w_k)`` (the direction that moves ``g_k`` towards and past 0) and
``c = |g_k(x)|``. The box margin is ``min_k sign(g_k) d_k``, the same rule as the R^d closed form: exact
for a correctly classified point (every ``g_k > 0``; the complement of the region of y within the box is
the union over k of ``{g_k <= 0}`` within the box); for a misclassified one, minus the largest distance
to a violated halfspace (within the box), which is at most the distance to the region of y (exact for
two classes). A point whose target cannot be reached anywhere in the box gets ``+inf`` (``-inf``
when misclassified).

Solving (*) in closed form. Moving coordinate i against ``sign(a_i)`` only lowers ``a . delta`` and raises
the norm, so ``delta_i = sign(a_i) t_i`` with ``0 <= t_i <= r_i``, where ``r_i`` is the room towards the
useful face (``1 - x_i`` if ``a_i > 0``, ``x_i`` if ``a_i < 0``). With ``alpha_i = |a_i|`` (*) becomes

    min ||t||_p   s.t.   alpha . t >= c,   0 <= t <= r,

feasible iff ``alpha . r >= c`` (the whole box reaches the target), else the distance is ``+inf``.

- p = inf: the best ``alpha . t`` with ``||t||_inf <= s`` is ``F(s) = sum_i alpha_i min(s, r_i)``,
  continuous, piecewise linear and nondecreasing in s with breakpoints at the ``r_i``. Sorting them,
  on the segment where ``F`` crosses c, ``F(s) = A + s B`` (``A``: the saturated coordinates'
  ``sum alpha_i r_i``, ``B``: the others' ``sum alpha_i``) and ``s = (c - A) / B``.
- p = 2: the KKT conditions of the convex program give ``t_i = min(lam alpha_i, r_i)`` for a
  multiplier ``lam >= 0``, and ``G(lam) = sum_i alpha_i min(lam alpha_i, r_i)`` is piecewise linear and
  nondecreasing with breakpoints ``r_i / alpha_i``: on the crossing segment ``G = A + lam B`` with
  ``B = sum alpha_i^2`` over the unsaturated coordinates, ``lam = (c - A) / B`` and
  ``||t||_2^2 = sum_saturated r_i^2 + lam^2 B``.
- p = 1: a fractional knapsack: each unit of ``t_i`` costs 1 and buys ``alpha_i``, so coordinates fill
  up to ``r_i`` in order of ``alpha_i`` descending until ``c`` is reached; the last one partially.

Each is a sort and a few cumulative sums per (point, class): ``O(D log D)``. Computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.core.linear import _check_multiclass, _pairwise, _prepare
from marginlab.core.norms import Norm

# (points x classes x features) per chunk: bounds the memory of the [n, K, D] tables (float64)
_CHUNK = 1 << 22


def _suffix(v: Tensor) -> Tensor:
    """``sum_{i > j} v_i`` per row ``[M, D]`` (exclusive; exact zeros after the last nonzero entry)."""
    inclusive = v.flip(1).cumsum(1).flip(1)
    return torch.cat([inclusive[:, 1:], torch.zeros_like(v[:, :1])], dim=1)


def _crossing(at_breaks: Tensor, c: Tensor) -> Tensor:
    """Index ``[M]`` of the first breakpoint where the nondecreasing ``at_breaks [M, D]`` reaches ``c``."""
    return (at_breaks < c[:, None]).sum(1).clamp(max=at_breaks.shape[1] - 1)


def _linf(alpha: Tensor, room: Tensor, c: Tensor) -> Tensor:
    r, order = room.sort(dim=1)
    a = alpha.gather(1, order)
    ar = (a * r).cumsum(1)  # saturated part, inclusive
    rest = _suffix(a)  # sum of alpha over coordinates with larger room
    j = _crossing(ar + r * rest, c)[:, None]
    big_a = (ar - a * r).gather(1, j)[:, 0]  # saturated strictly before the segment
    big_b = (rest + a).gather(1, j)[:, 0]
    s = (c - big_a) / big_b.clamp_min(1e-300)
    lo = torch.where(j[:, 0] > 0, r.gather(1, (j - 1).clamp_min(0))[:, 0], torch.zeros_like(s))
    return torch.minimum(torch.maximum(s, lo), r.gather(1, j)[:, 0])  # rounding: stay on the segment


def _l2(alpha: Tensor, room: Tensor, c: Tensor) -> Tensor:
    brk = torch.where(alpha > 0, room / alpha.clamp_min(1e-300), torch.full_like(room, math.inf))
    brk, order = brk.sort(dim=1)
    a, r = alpha.gather(1, order), room.gather(1, order)
    ar = (a * r).cumsum(1)
    rest = _suffix(a.square())  # sum of alpha^2 over coordinates saturating later
    at = ar + torch.where(rest > 0, brk * rest, torch.zeros_like(rest))  # inf * 0 where alpha = 0
    j = _crossing(at, c)[:, None]
    big_a = (ar - a * r).gather(1, j)[:, 0]
    big_b = (rest + a.square()).gather(1, j)[:, 0]
    lam = (c - big_a) / big_b.clamp_min(1e-300)
    saturated = (r.square().cumsum(1) - r.square()).gather(1, j)[:, 0]
    return (saturated + lam.square() * big_b).sqrt()


def _l1(alpha: Tensor, room: Tensor, c: Tensor) -> Tensor:
    a, order = alpha.sort(dim=1, descending=True)
    r = room.gather(1, order)
    ar = (a * r).cumsum(1)
    j = _crossing(ar, c)[:, None]
    big_a = (ar - a * r).gather(1, j)[:, 0]
    full = (r.cumsum(1) - r).gather(1, j)[:, 0]
    return full + (c - big_a) / a.gather(1, j)[:, 0].clamp_min(1e-300)


def box_distance(a: Tensor, c: Tensor, x: Tensor, p: Norm | float | str = 2) -> Tensor:
    """``min ||delta||_p`` s.t. ``a . delta >= c``, ``0 <= x + delta <= 1``, per row: ``[M]`` float64.

    ``a [M, D]``, ``c [M]``, ``x [M, D]`` in [0, 1], ``p`` in {1, 2, inf} (closed forms of the module
    docstring). ``0`` where ``c <= 0`` (x already satisfies it); ``+inf`` where no point of the box does.
    """
    lp = Norm.parse(p)
    a, c, x = a.double(), c.double(), x.double()
    room = torch.where(a > 0, 1.0 - x, x)
    alpha = a.abs()
    reach = (alpha * room).sum(1)
    solve = {math.inf: _linf, 2.0: _l2, 1.0: _l1}[lp.p]
    dist = torch.zeros_like(c)
    todo = (c > 0) & (reach >= c)
    if bool(todo.any()):
        dist[todo] = solve(alpha[todo], room[todo], c[todo])
    dist[(c > 0) & ~(reach >= c)] = math.inf
    return torch.where(c.isnan(), c, dist)


def linear_margins_box(
    weight: Tensor | nn.Linear,
    bias: Tensor | None,
    x: Tensor,
    y: Tensor,
    p: Norm | float | str = 2,
    signed: bool = True,
) -> Tensor:
    """Exact margins ``[N]`` (float64) of ``argmax_k (weight @ x + bias)_k`` over the box [0,1]^d.

    Arguments as :func:`marginlab.core.linear.linear_margins` (``x`` [N, D] or [N, C, H, W], in [0, 1]).
    Returns ``min_{k != y} sign(g_k) d_k`` (module docstring): for a correctly classified point the
    exact Lp distance, within the box, to the nearest image that another class wins (``+inf`` when none
    exists); for a misclassified one minus a lower bound of the distance, within the box, to the region
    of y (exact for two classes). Never below the R^d margin of a correctly classified point.
    """
    lp = Norm.parse(p)
    w, b, xf = _prepare(weight, bias, x)
    w, b, xf = w.double(), b.double(), xf.double()
    y = _check_multiclass(w, b, y, len(xf))
    if len(xf) and not bool(((xf >= 0) & (xf <= 1)).all()):
        raise ConfigError("the box domain needs inputs in [0, 1]; use the R^d closed form (domain rd)")
    k, d = w.shape
    step = max(1, _CHUNK // max(1, k * d))
    out = [_box_chunk(w, b, xf[i : i + step], y[i : i + step], lp) for i in range(0, len(xf), step)]
    margins = torch.cat(out) if out else torch.empty(0, dtype=torch.float64, device=xf.device)
    return margins if signed else margins.abs()


def _box_chunk(w: Tensor, b: Tensor, x: Tensor, y: Tensor, lp: Norm) -> Tensor:
    """Box margins ``[n]`` of ``x [n, D]``: one :func:`box_distance` per (point, class)."""
    g, _ = _pairwise(w, b, x, y, lp.q)  # [n, K], accurate differences of logits
    n, k = g.shape
    sign = g.sign()
    a = -sign[:, :, None] * (w[y][:, None, :] - w[None, :, :])  # [n, K, D]
    xs = x[:, None, :].expand(n, k, x.shape[1])
    dist = box_distance(a.reshape(n * k, -1), g.abs().reshape(-1), xs.reshape(n * k, -1), lp).view(n, k)
    ratio = torch.where(g == 0, torch.zeros_like(dist), sign * dist)
    ratio = ratio.scatter(1, y[:, None], math.inf)  # a class is not its own competitor
    return ratio.min(dim=1).values
