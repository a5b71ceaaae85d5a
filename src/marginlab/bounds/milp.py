"""A ReLU network on a perturbed input as a mixed-integer program (SCIP, through pyscipopt).

For a network's :class:`~marginlab.bounds.graph.Graph` (:func:`marginlab.bounds.network.network_graph`;
a list of ops is a chain), a point ``x0`` and an input set ``X``
(:class:`marginlab.bounds.domain.InputSet`) whose pre-activation bounds ``l <= z <= u`` are known
(:func:`marginlab.bounds.crown.layer_bounds`, keyed by node), :class:`MilpProgram` builds, on the
variables ``delta`` with ``x0 + delta`` in the interval hull of ``X``, the nodes in topological order:

- every run of affine nodes (:class:`~marginlab.bounds.ops.Dense`, ``Conv``, ``Scale``, ``Reshape``) in
  which each node reads the previous one and is its only reader merged into one map ``h -> M h + c``
  (:func:`network_blocks`), kept linear;
- an :class:`~marginlab.bounds.graph.Add` node: the sum of its two inputs' expressions;
- every ReLU ``a = max(z, 0)``: ``a = 0`` when ``u <= 0``, ``a = z`` when ``l >= 0`` (stable ReLUs never
  reach the solver as binaries), else the big-M encoding with one binary ``b``:
  ``a >= z, a >= 0, a <= z - l (1 - b), a <= u b``;
- every max-pooling window ``a = max_j z_j``: inputs with ``u_j < max_i l_i`` are never the maximum and
  drop out; of the rest, one binary ``b_j`` each, ``sum_j b_j = 1``, ``a >= z_j`` and
  ``a <= z_j + (max_i u_i - l_j) (1 - b_j)``;
- the logits: the last run of affine nodes as a matrix on the features below it
  (:meth:`MilpProgram.logit_gap`).

Two uses (:mod:`marginlab.estimators.mip`): the radius test ``max_delta min_r (C f)_r`` over the ball
(:meth:`MilpProgram.ball` adds it for ``p = inf``, 1, 2; :meth:`MilpProgram.maximize` sets the
objective and :meth:`MilpProgram.solve` stops at the first point with a positive value), and the
objective ``min ||delta||_p`` below a cutoff (:meth:`MilpProgram.objective`).

The tighter the bounds ``l, u`` (bounds over a smaller ball), the fewer the binaries and the smaller the
big-M constants. On a chain this is exactly the program of a list of layers. pyscipopt is optional:
callers import it and pass the module in (see :func:`marginlab.estimators.mip.require_scip`).
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
from marginlab.bounds.graph import INPUT, Add, Graph, as_graph
from marginlab.bounds.milp_cuts import NeuronTable, ideal_separator
from marginlab.bounds.ops import Affine, MaxPool, Op, ReLU

# SCIP settings of the radius test, measured on an MNIST 784-64-64-10 MLP (docs/bounds.md): SCIP's default
# cut loop spent 10-40 s at the root node of radius tests (a few percent of dual bound a round) that five
# root rounds then branching, without presolving or primal heuristics, closed in 1-4 s; the heuristics
# find nothing that PGD and the region refinement do not (benchmarks/bench_mip_mnist.py --variant
# scip-default: 3 of 10 points exact within 60 s, against 9 of 10).
TEST_PARAMS: dict[str, int | float] = {
    "separating/maxrounds": 0,
    "separating/maxroundsroot": 5,
}


@dataclass(frozen=True)
class AffineBlock:
    """A run of affine nodes merged into ``h -> M h + c``: ``matrix [out, in]``, ``bias [out]`` (float64);
    ``index``: its first node, ``last``: its last node (whose output it gives), ``source``: the node it
    reads (``INPUT`` = -1: the network's input)."""

    matrix: Tensor
    bias: Tensor
    index: int
    last: int = -1
    source: int = INPUT


@dataclass(frozen=True)
class LayerBlock:
    """One nonlinear node (:class:`ReLU` or :class:`MaxPool`) ``index`` reading node ``source``."""

    op: Op
    index: int
    source: int = INPUT


@dataclass(frozen=True)
class AddBlock:
    """An :class:`~marginlab.bounds.graph.Add` node ``index`` summing nodes ``sources``."""

    index: int
    sources: tuple[int, int]


Block = AffineBlock | LayerBlock | AddBlock


def affine_matrix(block: Sequence[Affine]) -> tuple[Tensor, Tensor]:
    """``(M [out,in], c [out])`` of a chain of affine ops (float64), by applying it to the identity."""
    n_in = math.prod(block[0].in_shape)
    h = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *block[0].in_shape)
    c = torch.zeros(1, *block[0].in_shape, dtype=torch.float64)
    for op in block:
        h, c = op.lin(h), op.forward(c)
    return h.reshape(n_in, -1).T.contiguous(), c.flatten()


def _affine_runs(graph: Graph) -> dict[int, list[int]]:
    """``{last node: [nodes of the run]}``: affine nodes merged where a node reads an affine node whose
    only reader it is."""
    users = graph.users()
    run_of: dict[int, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        if not isinstance(node.op, Affine):
            continue
        j = node.inputs[0]
        if j != INPUT and isinstance(graph.nodes[j].op, Affine) and users[j] == [i]:
            run = run_of.pop(j)
            run.append(i)
        else:
            run = [i]
        run_of[i] = run
    return run_of


def network_blocks(network: Graph | Sequence[Op]) -> list[Block]:
    """The nodes of ``network`` in topological order, runs of affine nodes merged into one
    :class:`AffineBlock` each (placed at the run's last node)."""
    graph = as_graph(network)
    runs = _affine_runs(graph)
    out: list[Block] = []
    for i, node in enumerate(graph.nodes):
        if isinstance(node.op, Add):
            out.append(AddBlock(i, (node.inputs[0], node.inputs[1])))
        elif isinstance(node.op, Affine):
            if i in runs:
                run = runs[i]
                ops = [graph.nodes[j].op for j in run]
                assert all(isinstance(op, Affine) for op in ops)
                m, c = affine_matrix([op for op in ops if isinstance(op, Affine)])
                out.append(AffineBlock(m, c, run[0], i, graph.nodes[run[0]].inputs[0]))
        else:
            out.append(LayerBlock(node.op, i, node.inputs[0]))
    return out


class MilpProgram:
    """One SCIP model: the network on ``x0 + delta`` with the bounds of a given input set.

    ``scip``: the pyscipopt module; ``blocks``: :func:`network_blocks` of the network; ``bounds``:
    :func:`layer_bounds` over ``inset`` (one point: ``inset.x0 [1,D]``); ``x0 [*in]`` (float64). ``m`` is
    the SCIP model (add constraints to it), ``delta`` the ``D`` perturbation variables, bounded by the
    interval hull of ``inset``; ``binaries`` counts the unstable ReLUs and pooling choices encoded.
    """

    def __init__(
        self, scip: ModuleType, blocks: Sequence[Block], bounds: Bounds, x0: Tensor, inset: InputSet
    ) -> None:
        self.m = scip.Model()
        self.m.hideOutput()
        self.m.setParam("randomization/randomseedshift", 0)
        self.scip = scip
        self.binaries = 0
        self._unstable: list[tuple[Any, Any, Any]] = []  # (pre-activation, output, binary) per ReLU
        lo, hi = (t[0].tolist() for t in inset.interval())
        x = x0.flatten().tolist()
        self.delta = [self.m.addVar(lb=l - xi, ub=u - xi) for l, u, xi in zip(lo, hi, x, strict=True)]
        outs: dict[int, list[Any]] = {INPUT: [xi + d for xi, d in zip(x, self.delta, strict=True)]}
        head = blocks[-1]
        for block in blocks if not isinstance(head, AffineBlock) else blocks[:-1]:
            if isinstance(block, AffineBlock):
                outs[block.last] = self._affine(outs[block.source], block.matrix, block.bias)
            elif isinstance(block, AddBlock):
                a, b = (outs[j] for j in block.sources)
                outs[block.index] = [ai + bi for ai, bi in zip(a, b, strict=True)]
            elif isinstance(block.op, ReLU):
                lo_b, hi_b = (t[0].flatten().tolist() for t in bounds[block.index])
                outs[block.index] = self._relu(outs[block.source], lo_b, hi_b)
            else:
                assert isinstance(block.op, MaxPool)
                outs[block.index] = self._pool(outs[block.source], block.op, bounds[block.index])
        if isinstance(head, AffineBlock):
            self.features, self.head = outs[head.source], head
        else:  # the logits come from an Add or a nonlinear node: no matrix to merge with
            k = len(outs[max(outs)])
            self.features = outs[max(outs)]
            self.head = AffineBlock(
                torch.eye(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), -1
            )

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
            self.binaries += 1
            self.m.addCons(a >= v)
            self.m.addCons(a <= v - l * (1 - b))
            self.m.addCons(a <= u * b)
            self._unstable.append((zj, a, b))
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
                self.binaries += len(bs)
                for j, b in zip(live, bs, strict=True):
                    self.m.addCons(a >= h[ids[j]])
                    self.m.addCons(a <= h[ids[j]] + (top - lows[j]) * (1 - b))
                self.m.addCons(self.scip.quicksum(bs) == 1)
                out.append(a)
        return out

    def logit_gap(self, k: int, y: int) -> Any:
        """Expression of ``f_k - f_y``."""
        eye = torch.eye(len(self.head.bias), dtype=torch.float64)
        return self.spec_row(eye[k] - eye[y])

    def spec_row(self, row: Tensor) -> Any:
        """Expression of ``row . f`` for ``row [K]`` on the logits ``f``."""
        return self._dot(row @ self.head.matrix, self.features) + float(row @ self.head.bias)

    def ball(self, p: float, eps: float) -> None:
        """Restrict ``delta`` to ``||delta||_p <= eps`` (``p = inf``: already, by the variables' bounds)."""
        if p == math.inf:
            return
        if p == 1.0:
            s = [self.m.addVar(lb=0.0) for _ in self.delta]
            for si, d in zip(s, self.delta, strict=True):
                self.m.addCons(si >= d)
                self.m.addCons(si >= -d)
            self.m.addCons(self.scip.quicksum(s) <= eps)
        else:
            self.m.addCons(self.scip.quicksum(d * d for d in self.delta) <= eps**2)

    def maximize(self, spec: Tensor, *, tuned: bool = True, cuts: bool = False) -> None:
        """Objective ``max min_r spec[r] . f`` over the program, ``spec [S,K]``; only points where it is
        positive count (SCIP's objective limit 0 prunes every node whose bound is not). ``tuned``: the
        settings of :data:`TEST_PARAMS`, no presolving, no primal heuristics (else SCIP's defaults);
        ``cuts``: the ideal ReLU cuts of :mod:`marginlab.bounds.milp_cuts` at the root."""
        rows = [self.spec_row(r) for r in spec]
        if len(rows) == 1:
            self.m.setObjective(rows[0], "maximize")
        else:
            s = self.m.addVar(lb=-self.m.infinity())
            for r in rows:
                self.m.addCons(s <= r)
            self.m.setObjective(s, "maximize")
        self.m.setObjlimit(0.0)
        self.m.setParam("limits/solutions", 1)  # the first positive point settles the test
        if cuts:
            self.add_ideal_cuts()
        if not tuned:
            return
        for key, value in TEST_PARAMS.items():
            self.m.setParam(key, value)
        self.m.setPresolve(self.scip.SCIP_PARAMSETTING.OFF)
        self.m.setHeuristics(self.scip.SCIP_PARAMSETTING.OFF)

    def add_ideal_cuts(self) -> None:
        """Have SCIP separate the ideal cuts of every unstable ReLU (:mod:`marginlab.bounds.milp_cuts`) in
        its root rounds."""
        if not self._unstable:
            return
        table = NeuronTable()
        for z, a, b in self._unstable:
            table.add(z, a, b)
        sepa = ideal_separator(self.scip, table)
        self.m.includeSepa(sepa, "ideal", "ideal ReLU cuts", priority=100000, freq=0)

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
        (the dual bound is of ``||delta||_2^2`` for ``p = 2``; ``inf`` when infeasible).

        Radius test (:meth:`maximize`): status ``"infeasible"`` means no point of the set has a positive
        objective (the test passed), a ``delta`` is such a point; anything else ran out of time."""
        self.m.setParam("limits/time", max(seconds, 0.01))
        if p != 2.0:
            # Tighter than SCIP's 1e-6 for the MILPs: a nearly-integral big-M binary leaks l * tol into a
            # ReLU. (For the MIQP it makes the quadratic constraint very slow to enforce: default there.)
            self.m.setParam("numerics/feastol", 1e-8)
        self.m.optimize()
        status = self.m.getStatus()
        delta = None
        if self.m.getNSols() > 0 and status != "infeasible":
            sol = self.m.getBestSol()
            delta = torch.tensor([self.m.getSolVal(sol, d) for d in self.delta], dtype=torch.float64)
        dual = self.m.getDualbound() if status != "infeasible" else math.inf
        return status, dual, delta
