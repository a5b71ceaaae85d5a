"""The linear region of a ReLU network around a point, and the closest point of a region where a
linear specification of the logits holds.

A ReLU / max-pooling network is affine on each *linear region*: the inputs that share one activation
pattern (which ReLUs are active, which entry wins each pooling window). :func:`linear_region` reads the
pattern at a point ``x`` and returns its region as the polyhedron ``{x' : G x' <= h}`` on which the
logits are ``f(x') = A x' + c``: every active ReLU adds ``z(x') >= 0``, every inactive one
``z(x') <= 0``, every pooling window ``z_j(x') <= z_winner(x')``.

:func:`closest_in_region` then solves the convex program

    min ||x' - x0||_p   s.t.   G x' <= h,   C (A x' + c) >= tau (every row),   lo <= x' <= hi,

for ``p = inf`` and ``p = 1`` as a linear program (HiGHS through ``scipy.optimize.linprog``) and for
``p = 2`` through its dual (``max_{lambda >= 0}`` of a smooth concave function of the constraints'
multipliers, L-BFGS-B; the primal point is ``clip(-P^T lambda)``). The answer, where the program is
feasible, is the smallest perturbation of ``x0`` inside that region that satisfies the specification: a
local optimum of the minimum-norm adversarial problem, which the exact search of
:mod:`marginlab.estimators.mip` uses to shorten its bracket's upper end. Callers verify it by a forward
pass (the solvers' tolerances are not exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linprog, minimize
from torch import Tensor

from marginlab.bounds.graph import INPUT, Add, Graph
from marginlab.bounds.ops import Affine, MaxPool


@dataclass(frozen=True)
class Region:
    """``{x : g x <= h}`` (``g [M,D]``, ``h [M]``) on which the logits are ``a x + c`` (``a [K,D]``,
    ``c [K]``); float64."""

    g: Tensor
    h: Tensor
    a: Tensor
    c: Tensor


def linear_region(graph: Graph, x: Tensor) -> Region:
    """The linear region of ``graph`` that holds ``x [*in]`` (module doc). Ties (a ReLU input exactly 0)
    count as inactive."""
    d = x.numel()
    # Per node: its output as x -> sum_i x_i A[i] + c, A [D,*shape], and its value v at x.
    outs: dict[int, tuple[Tensor, Tensor, Tensor]] = {
        INPUT: (
            torch.eye(d, dtype=torch.float64).reshape(d, *graph.in_shape),
            torch.zeros(graph.in_shape, dtype=torch.float64),
            x.double().reshape(graph.in_shape),
        )
    }
    rows: list[Tensor] = []
    rhs: list[Tensor] = []
    for i, node in enumerate(graph.nodes):
        a, c, v = outs[node.inputs[0]]
        op = node.op
        if isinstance(op, Add):
            a2, c2, v2 = outs[node.inputs[1]]
            outs[i] = (a + a2, c + c2, v + v2)
        elif isinstance(op, Affine):
            outs[i] = (op.lin(a), op.forward(c[None])[0], op.forward(v[None])[0])
        elif isinstance(op, MaxPool):
            outs[i] = _pool(op, a, c, v, rows, rhs)
        else:  # ReLU: active rows z >= 0 (-z <= 0), inactive z <= 0
            on = v > 0
            sign = torch.where(on, -1.0, 1.0).to(torch.float64)
            rows.append((a * sign).reshape(d, -1).T)
            rhs.append((-c * sign).flatten())
            mask = on.to(torch.float64)
            outs[i] = (a * mask, c * mask, v * mask)
    a, c, _ = outs[len(graph) - 1]
    g = torch.cat(rows) if rows else torch.zeros(0, d, dtype=torch.float64)
    h = torch.cat(rhs) if rhs else torch.zeros(0, dtype=torch.float64)
    return Region(g, h, a.reshape(d, -1).T.contiguous(), c.flatten())


def _pool(
    op: MaxPool, a: Tensor, c: Tensor, v: Tensor, rows: list[Tensor], rhs: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """A max-pooling node at its winners: constraints ``z_j - z_win <= 0`` appended, outputs gathered."""
    d = len(a)
    aw, cw, vw = op.windows(a), op.windows(c[None])[0], op.windows(v[None])[0]  # [.,C,kk,L]
    win = vw.argmax(dim=1, keepdim=True)  # [C,1,L]
    a_win = aw.gather(2, win[None].expand(d, -1, -1, -1))  # [D,C,1,L]
    c_win = cw.gather(1, win)
    others = torch.ones_like(vw, dtype=torch.bool).scatter(1, win, False)  # [C,kk,L]
    diff_a = (aw - a_win)[:, others]  # [D, n]
    rows.append(diff_a.T)
    rhs.append(-(cw - c_win)[others])
    shape = (d, *op.out_shape)
    return a_win.reshape(shape), c_win.reshape(op.out_shape), vw.gather(1, win).reshape(op.out_shape)


def closest_in_region(
    region: Region,
    x0: Tensor,
    spec: Tensor,
    p: float,
    lo: Tensor,
    hi: Tensor,
    tau: float = 0.0,
) -> Tensor | None:
    """The perturbation ``delta [D]`` (float64) of smallest ``p``-norm with ``x0 + delta`` in ``region``,
    ``spec [S,K] (A (x0 + delta) + c) >= tau`` and ``lo <= x0 + delta <= hi`` (``x0, lo, hi [D]``);
    ``None`` when the program is infeasible or the solver fails. ``p``: ``inf``, 1 or 2."""
    x0 = x0.double().flatten()
    sa = spec.double() @ region.a  # [S,D]
    # P delta <= q: the region's rows and the specification's
    p_mat = torch.cat([region.g, -sa]).numpy()
    q = torch.cat([region.h - region.g @ x0, spec.double() @ (region.a @ x0 + region.c) - tau]).numpy()
    lower, upper = (lo.double().flatten() - x0).numpy(), (hi.double().flatten() - x0).numpy()
    if p == 2.0:
        return _closest_l2(p_mat, q, lower, upper)
    return _closest_lp(p_mat, q, lower, upper, p)


def _closest_lp(
    p_mat: np.ndarray, q: np.ndarray, lower: np.ndarray, upper: np.ndarray, p: float
) -> Tensor | None:
    """``p = inf``: variables ``(delta, t)``, ``|delta_i| <= t``; ``p = 1``: ``(delta, s)``, ``|delta_i| <=
    s_i``; minimise ``t`` or ``sum s``."""
    d = len(lower)
    eye = sp.identity(d, format="csr")
    if p == math.inf:
        aux = sp.csr_matrix(-np.ones((d, 1)))
        cost = np.r_[np.zeros(d), 1.0]
        n_aux = 1
    else:
        aux = -eye
        cost = np.r_[np.zeros(d), np.ones(d)]
        n_aux = d
    a_ub = sp.vstack(
        [
            sp.hstack([sp.csr_matrix(p_mat), sp.csr_matrix((len(p_mat), n_aux))]),
            sp.hstack([eye, aux]),
            sp.hstack([-eye, aux]),
        ]
    ).tocsr()
    b_ub = np.r_[q, np.zeros(2 * d)]
    bounds = np.c_[np.r_[lower, np.zeros(n_aux)], np.r_[upper, np.full(n_aux, np.inf)]]
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if res.status != 0:
        return None
    return torch.tensor(res.x[:d], dtype=torch.float64)


def _closest_l2(p_mat: np.ndarray, q: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> Tensor | None:
    """``min 1/2 ||delta||^2`` s.t. ``P delta <= q``, ``lower <= delta <= upper`` by its dual: for
    ``lambda >= 0``, ``delta(lambda) = clip(-P^T lambda)`` minimises the Lagrangian over the box, and
    ``phi(lambda) = 1/2 ||delta||^2 + lambda . (P delta - q)`` is concave with gradient ``P delta - q``."""

    def neg_phi(lam: np.ndarray) -> tuple[float, np.ndarray]:
        delta = np.clip(-p_mat.T @ lam, lower, upper)
        slack = p_mat @ delta - q
        return -(0.5 * float(delta @ delta) + float(lam @ slack)), -slack

    lam0 = np.zeros(len(q))
    res = minimize(
        neg_phi,
        lam0,
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, None)] * len(q),
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
    )
    delta = np.clip(-p_mat.T @ res.x, lower, upper)
    if not np.isfinite(delta).all() or (p_mat @ delta - q).max(initial=-np.inf) > 1e-6:
        return None  # infeasible (the dual is unbounded) or not converged
    return torch.tensor(delta, dtype=torch.float64)
