"""Back-substitution over a network's :class:`~marginlab.bounds.graph.Graph`: rows of linear functions of
one node's output pulled down to the network's input, then minimised over the input set.

Rows (:class:`~marginlab.bounds.windows.Rows`) start at node ``start`` with coefficients ``A``. Walking the
nodes from ``start`` down in reverse topological order, every node holding rows passes them to its
inputs: an operation by its relaxation, ``A op(z) >= A' z + d`` (exact for affine ones; ReLU and
max-pooling by the relaxations of :mod:`marginlab.bounds.ops` at the bounds of their inputs), an
:class:`~marginlab.bounds.graph.Add` unchanged to both of its inputs; rows that meet at a node add up
(two branches of a residual block). The offsets ``d`` accumulate; at the input,
``L = min_{x in X} A x + sum d`` (:meth:`InputSet.concretize`) is a lower bound of the rows' functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from marginlab.bounds.domain import InputSet
from marginlab.bounds.graph import INPUT, Add, Graph
from marginlab.bounds.ops import Conv, Dense, MaxPool, ReLU, Reshape, Scale, Shape
from marginlab.bounds.windows import (
    Rows,
    affine_back,
    conv_back,
    full,
    gather,
    gather_masked,
    merge,
    pool_back,
    relu_back,
)

Bounds = dict[int, tuple[Tensor, Tensor]]  # node index -> (l, u) [B,*in_shape] at a nonlinear node's input


@dataclass
class Relaxations:
    """The relaxation of every nonlinear node at given bounds, per point.

    ``relu[k]``: ``(lower slope, chord slope, chord intercept)``, each ``[B,*shape]``
    (:meth:`ReLU.relax`); ``pool[k]``: ``(star, dominated, top)`` ``[B,*out]`` (:meth:`MaxPool.relax`);
    ``slopes[k]``: optional lower slopes per row ``[B,S,*shape]`` replacing ``relu[k][0]`` for rows
    ``(point, spec)`` (alpha-CROWN, :mod:`marginlab.bounds.alpha`).
    """

    relu: dict[int, tuple[Tensor, Tensor, Tensor]]
    pool: dict[int, tuple[Tensor, Tensor, Tensor]]
    slopes: dict[int, Tensor] = field(default_factory=dict)

    def points(self, sel: slice) -> Relaxations:
        """The relaxations of the points ``sel`` of the batch (without per-row slopes)."""
        relu = {k: (a[sel], b[sel], c[sel]) for k, (a, b, c) in self.relu.items()}
        return Relaxations(relu, {k: (a[sel], b[sel], c[sel]) for k, (a, b, c) in self.pool.items()})


def relaxations(graph: Graph, bounds: Bounds) -> Relaxations:
    """The relaxations of the nonlinear nodes of ``graph`` at ``bounds`` (keyed by node)."""
    relu: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    pool: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for k, node in enumerate(graph.nodes):
        if isinstance(node.op, ReLU):
            relu[k] = ReLU.relax(*bounds[k])
        elif isinstance(node.op, MaxPool):
            pool[k] = node.op.relax(*bounds[k])
    return Relaxations(relu, pool)


def _back(graph: Graph, k: int, rows: Rows, relax: Relaxations) -> tuple[Rows, Tensor]:
    """Rows on node ``k``'s output -> rows on its (single) input and ``d [R]``."""
    op = graph.nodes[k].op
    if isinstance(op, ReLU):
        low, up, bias = relax.relu[k]
        slopes = relax.slopes.get(k)
        if slopes is not None:
            low_rows = gather(slopes.flatten(0, 1), rows.point * slopes.shape[1] + rows.spec, rows)
        else:
            low_rows = gather(low, rows.point, rows)
        return relu_back(rows, low_rows, gather(up, rows.point, rows), gather(bias, rows.point, rows))
    if isinstance(op, MaxPool):
        return pool_back(op, rows, relax.pool[k])
    if isinstance(op, Conv):
        return conv_back(op, rows)
    if isinstance(op, Dense | Scale | Reshape):
        return affine_back(op, rows)
    raise TypeError(f"no backward rule for {type(op).__name__}")


def _shape(graph: Graph, j: int) -> Shape:
    return graph.in_shape if j == INPUT else graph.nodes[j].op.out_shape


def _step(graph: Graph, k: int, held: dict[int, Rows], relax: Relaxations) -> Tensor | None:
    """Pass the rows held at node ``k``'s output (if any) to its inputs; their offset ``d [R]``."""
    here = held.pop(k, None)
    if here is None:
        return None
    node = graph.nodes[k]
    if isinstance(node.op, Add):
        targets, dk = [(j, here) for j in node.inputs], None
    else:
        below, dk = _back(graph, k, here, relax)
        targets = [(node.inputs[0], below)]
    for j, r in targets:
        held[j] = merge(held[j], r, _shape(graph, j)) if j in held else r
    return dk


def to_input(graph: Graph, start: int, rows: Rows, relax: Relaxations) -> tuple[Rows, Tensor]:
    """Rows on node ``start``'s output -> ``(rows on the network's input, d [R])`` with
    ``rows_start . h_start >= rows_input . x + d`` wherever the bounds of ``relax`` hold."""
    held: dict[int, Rows] = {start: rows}
    d = torch.zeros(len(rows), dtype=rows.coef.dtype, device=rows.coef.device)
    for k in range(start, -1, -1):
        dk = _step(graph, k, held, relax)
        d = d if dk is None else d + dk
    return held[INPUT], d


def concretize(graph: Graph, rows: Rows, inset: InputSet) -> Tensor:
    """``min_{x in X} rows . x`` ``[R]`` for rows on the network's input, per row over its point's set."""
    x0 = inset.x0.reshape(len(inset.x0), *graph.in_shape)
    if len(graph.in_shape) == 3 and rows.offset is not None:
        x0 = gather_masked(x0, rows.point, rows)  # zero outside the image, where the rows are zero
    else:
        x0 = x0[rows.point]
    sub = InputSet(x0.flatten(1), inset.eps[rows.point], inset.p, inset.box)
    return sub.concretize(rows.coef.flatten(1)[:, None])[:, 0]


Settle = Callable[[Tensor, Tensor], Tensor]


def _interval(rows: Rows, box: tuple[Tensor, Tensor]) -> Tensor:
    """``min rows . h`` ``[R]`` over the box ``lo <= h <= hi`` (``[B,*shape]``) of each row's point."""
    lo, hi = (gather(t, rows.point, rows) for t in box)
    return (rows.coef.clamp(min=0) * lo + rows.coef.clamp(max=0) * hi).flatten(1).sum(1)


def _select(rows: Rows, keep: Tensor) -> Rows:
    """The rows ``keep [R]`` (bool) of ``rows``."""
    offset = None if rows.offset is None else rows.offset[keep]
    return Rows(rows.coef[keep], rows.point[keep], rows.spec[keep], offset)


def lower(
    graph: Graph,
    start: int,
    rows: Rows,
    relax: Relaxations,
    inset: InputSet,
    *,
    boxes: dict[int, tuple[Tensor, Tensor]] | None = None,
    settle: Settle | None = None,
    offset: Tensor | None = None,
) -> Tensor:
    """Lower bounds ``[R]`` of the rows' functions of node ``start``'s output (``INPUT``: the input)
    plus ``offset [R]`` (default 0) over ``inset``.

    Early exit: with ``boxes`` (interval bounds ``[B,*shape]`` of every node's output below ``start``)
    and ``settle``, each time the rows have passed a nonlinear node their interval lower bound
    ``sum_j min_{box_j} rows_j . h_j + d`` (sound, looser) is computed, and ``settle(values [r],
    row ids [r])`` says which rows may stop there with it (e.g. a neuron already proven stable).
    """
    held: dict[int, Rows] = {start: rows}
    ids = torch.arange(len(rows), device=rows.coef.device)
    d = torch.zeros(len(rows), dtype=rows.coef.dtype, device=rows.coef.device) if offset is None else offset
    out = torch.empty_like(d)
    for k in range(start, -1, -1):
        dk = _step(graph, k, held, relax)
        if dk is None:
            continue
        d = d + dk
        if settle is None or boxes is None or not isinstance(graph.nodes[k].op, ReLU | MaxPool):
            continue
        if INPUT in held:  # the input is next: concretize there, exactly
            continue
        value = d + sum((_interval(r, boxes[j]) for j, r in held.items()), torch.zeros_like(d))
        done = settle(value, ids)
        if bool(done.any()):
            out[ids[done]] = value[done]
            keep = ~done
            held = {j: _select(r, keep) for j, r in held.items()}
            ids, d = ids[keep], d[keep]
            if len(ids) == 0:
                return out
    out[ids] = concretize(graph, held[INPUT], inset) + d
    return out


def input_rows(graph: Graph, spec: Tensor, relax: Relaxations, *, first: int = 0) -> tuple[Tensor, Tensor]:
    """A specification ``spec [B,S,K]`` on the logits of the points ``first .. first + B - 1`` (of the
    batch ``relax`` describes) as ``(A [B,S,D], d [B,S])`` on the input: ``spec f(x) >= A x + d``
    wherever the bounds of ``relax`` hold."""
    b, s = spec.shape[:2]
    point = torch.arange(first, first + b, device=spec.device).repeat_interleave(s)
    rows = Rows(spec.reshape(b * s, -1), point, torch.arange(s, device=spec.device).repeat(b))
    below, d = to_input(graph, len(graph) - 1, rows, relax)
    below = full(below, graph.in_shape) if len(graph.in_shape) == 3 else below
    return below.coef.reshape(b, s, -1), d.reshape(b, s)
