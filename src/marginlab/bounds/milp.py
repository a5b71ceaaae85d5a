"""A ReLU network on a perturbed input as a mixed-integer program (SCIP, through pyscipopt).

For the operations of a network (:func:`marginlab.bounds.network.network_ops`), a point ``x0`` and an
input set ``X`` (:class:`marginlab.bounds.domain.InputSet`) whose pre-activation bounds ``l <= z <= u``
are known (:func:`marginlab.bounds.crown.layer_bounds`), :class:`MilpProgram` builds, on the variables
``delta`` with ``x0 + delta`` in the interval hull of ``X``:

- consecutive affine operations merged into one map ``h -> M h + c`` (:func:`network_blocks`), kept
  linear;
- every ReLU ``a = max(z, 0)``: ``a = 0`` when ``u <= 0``, ``a = z`` when ``l >= 0``, else the big-M
  encoding with one binary ``b``: ``a >= z, a >= 0, a <= z - l (1 - b), a <= u b``;
- every max-pooling window ``a = max_j z_j``: inputs with ``u_j < max_i l_i`` are never the maximum and
  drop out; of the rest, one binary ``b_j`` each, ``sum_j b_j = 1``, ``a >= z_j`` and
  ``a <= z_j + (max_i u_i - l_j) (1 - b_j)``;
- the logits ``f = M h + c`` of the last block as expressions (:meth:`MilpProgram.logit_gap`);
- the objective ``min ||delta||_p`` below a cutoff (:meth:`MilpProgram.objective`): ``p = inf`` and
  ``p = 1`` by auxiliary variables (MILPs), ``p = 2`` as ``||delta||_2^2 <= t``, minimise ``t`` (an MIQP).

The tighter the bounds ``l, u``, the smaller the big-M constants and the faster SCIP closes the program.
pyscipopt is optional: callers import it and pass the module in (see
:func:`marginlab.estimators.mip.require_scip`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from marginlab.bounds.crown import Bounds
from marginlab.bounds.domain import InputSet
from marginlab.bounds.ops import Affine, MaxPool, Op, ReLU


@dataclass(frozen=True)
class AffineBlock:
    """Consecutive affine operations merged into ``h -> M h + c``: ``matrix [out, in]``, ``bias [out]``
    (float64); ``index``: the position of its first operation in the list."""

    matrix: Tensor
    bias: Tensor
    index: int


@dataclass(frozen=True)
class LayerBlock:
    """One nonlinear operation (:class:`ReLU` or :class:`MaxPool`) at position ``index`` of the list."""

    op: Op
    index: int


Block = AffineBlock | LayerBlock


def affine_matrix(block: Sequence[Affine]) -> tuple[Tensor, Tensor]:
    """``(M [out,in], c [out])`` of a chain of affine ops (float64), by applying it to the identity."""
    n_in = math.prod(block[0].in_shape)
    h = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *block[0].in_shape)
    c = torch.zeros(1, *block[0].in_shape, dtype=torch.float64)
    for op in block:
        h, c = op.lin(h), op.forward(c)
    return h.reshape(n_in, -1).T.contiguous(), c.flatten()


def network_blocks(ops: Sequence[Op]) -> list[Block]:
    """``ops`` with every run of consecutive affine ops merged into one :class:`AffineBlock`."""
    out: list[Block] = []
    run: list[Affine] = []
    for i, op in enumerate([*ops, None]):
        if isinstance(op, Affine):
            run.append(op)
            continue
        if run:
            out.append(AffineBlock(*affine_matrix(run), i - len(run)))
            run = []
        if op is not None:
            out.append(LayerBlock(op, i))
    return out


class MilpProgram:
    """One SCIP model: the network on ``x0 + delta`` with the bounds of a given input set.

    ``scip``: the pyscipopt module; ``blocks``: :func:`network_blocks` of the network, ending in the affine
    logits; ``bounds``: :func:`layer_bounds` over ``inset`` (one point: ``inset.x0 [1,D]``); ``x0 [*in]``
    (float64). ``m`` is the SCIP model (add constraints to it), ``delta`` the ``D`` perturbation variables.
    """

    def __init__(
        self, scip: ModuleType, blocks: Sequence[Block], bounds: Bounds, x0: Tensor, inset: InputSet
    ) -> None:
        self.m = scip.Model()
        self.m.hideOutput()
        self.m.setParam("randomization/randomseedshift", 0)
        self.scip = scip
        lo, hi = (t[0].tolist() for t in inset.interval())
        x = x0.flatten().tolist()
        self.delta = [self.m.addVar(lb=l - xi, ub=u - xi) for l, u, xi in zip(lo, hi, x, strict=True)]
        h: list[Any] = [xi + d for xi, d in zip(x, self.delta, strict=True)]
        for block in blocks[:-1]:
            if isinstance(block, AffineBlock):
                h = self._affine(h, block.matrix, block.bias)
            elif isinstance(block.op, ReLU):
                h = self._relu(h, *(t[0].flatten().tolist() for t in bounds[block.index]))
            else:
                assert isinstance(block.op, MaxPool)
                h = self._pool(h, block.op, bounds[block.index])
        self.features = h
        head = blocks[-1]
        assert isinstance(head, AffineBlock)
        self.head = head

    def _affine(self, h: list[Any], m: Tensor, c: Tensor) -> list[Any]:
        return [self._dot(row, h) + float(cj) for row, cj in zip(m, c, strict=True)]

    def _dot(self, row: Tensor, h: list[Any]) -> Any:
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

    def _pool(self, h: list[Any], op: MaxPool, bounds: tuple[Tensor, Tensor]) -> list[Any]:
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
        m, c = self.head.matrix, self.head.bias
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

    def solve(self, seconds: float, p: float) -> tuple[str, float, Tensor | None]:
        """``(status, dual bound of the objective, delta [D] float64 or None)`` after at most ``seconds``
        (the dual bound is of ``||delta||_2^2`` for ``p = 2``; ``inf`` when infeasible)."""
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
