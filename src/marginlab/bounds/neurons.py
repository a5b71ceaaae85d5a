"""Rows for intermediate bounds: which neurons of a node need them, the unit rows ``+e_j`` / ``-e_j``, and
the floats one row holds on its way to the input (to size chunks under a memory budget).

A neuron needs rows when its bounds decide an inexact relaxation (:func:`needs_rows`): an unstable ReLU
input, or an input of a max-pooling window whose maximum is still open (directly, or through a ReLU).
A neuron whose rows prove it stable on the way down may stop there (:func:`exits`), since the ReLU is
exact on it whatever its bounds, unless a max-pooling reads the ReLU's output (then only inactive ones
stop: their ReLU output is exactly 0).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from marginlab.bounds.graph import INPUT, Add, Graph
from marginlab.bounds.ops import Conv, Dense, MaxPool, Op, ReLU, Scale, Shape
from marginlab.bounds.windows import Rows, fit


def undecided_inputs(pool: MaxPool, lo: Tensor, hi: Tensor) -> Tensor:
    """``[B,*in]`` bool: inputs of pooling windows whose maximum the bounds ``lo, hi`` leave open."""
    _, dominated, _ = pool.relax(lo, hi)
    kh, kw = pool.kernel
    c, h, w = dominated.shape[1:]
    cols = (~dominated).to(lo.dtype).reshape(len(lo), c, 1, h * w).expand(-1, -1, kh * kw, -1)
    spread = F.fold(
        cols.reshape(len(lo), c * kh * kw, h * w), pool.in_shape[1:], pool.kernel, stride=pool.stride
    )
    return spread > 0


def exits(graph: Graph, users: list[list[int]], k: int) -> tuple[bool, bool]:
    """Whether a neuron of node ``k`` proven active / inactive needs no tighter bounds: yes for inputs
    of ReLUs (exact there), except that a max-pooling of the ReLU needs the active ones' bounds."""
    ops = [graph.nodes[c].op for c in users[k]]
    if any(isinstance(op, MaxPool) for op in ops):
        return False, False
    pooled = any(isinstance(graph.nodes[m].op, MaxPool) for c in users[k] for m in users[c])
    return not pooled, True


def needs_rows(graph: Graph, users: list[list[int]], k: int, lo: Tensor, hi: Tensor) -> Tensor:
    """``[B,*shape]`` bool: the outputs of node ``k`` whose bounds decide an inexact relaxation."""
    need = torch.zeros_like(lo, dtype=torch.bool)
    for c in users[k]:
        op = graph.nodes[c].op
        if isinstance(op, ReLU):
            need |= (lo < 0) & (hi > 0)
            for m in users[c]:  # a max-pooling of the ReLU's output: its open windows' active inputs
                pool = graph.nodes[m].op
                if isinstance(pool, MaxPool):
                    need |= (hi > 0) & undecided_inputs(pool, lo.clamp(min=0), hi.clamp(min=0))
        elif isinstance(op, MaxPool):
            need |= undecided_inputs(op, lo, hi)
    return need


def row_floats(graph: Graph, start: int, windowed: bool) -> int:
    """Floats one row starting at node ``start`` holds at most on its way down: its coefficients on a
    window or map, times the kernel area where a transposed convolution unfolds them."""
    wins: dict[int, tuple[int, int] | None] = {start: (1, 1) if windowed else None}
    peak = 1
    for k in range(start, -1, -1):
        if k not in wins:
            continue
        win, op = wins.pop(k), graph.nodes[k].op
        peak = max(peak, _numel(op.out_shape, win))
        below = _window_below(op, win)
        if isinstance(op, Conv):
            peak = max(peak, _numel(op.in_shape, below) * int(op.w.shape[2] * op.w.shape[3]))
        for j in graph.nodes[k].inputs:
            if j == INPUT:
                continue
            shape = graph.nodes[j].op.out_shape
            if j in wins:  # two branches meet: the union of the windows is at most their sum
                prev = wins[j]
                below = None if prev is None or below is None else (prev[0] + below[0], prev[1] + below[1])
            wins[j] = _crop(below, shape)
    return peak


def _window_below(op: Op | Add, win: tuple[int, int] | None) -> tuple[int, int] | None:
    """The window size on ``op``'s input of rows on a window of size ``win`` of its output."""
    if win is None:
        return None
    if isinstance(op, Conv):
        kernel, stride, dil = (int(op.w.shape[2]), int(op.w.shape[3])), op.stride2, op.dilation2
    elif isinstance(op, MaxPool):
        kernel, stride, dil = op.kernel, op.stride, (1, 1)
    elif isinstance(op, Add | ReLU | Scale):
        return win
    else:
        return None
    h, w = ((n - 1) * s + d * (kk - 1) + 1 for n, s, d, kk in zip(win, stride, dil, kernel, strict=True))
    return h, w


def _crop(win: tuple[int, int] | None, shape: Shape) -> tuple[int, int] | None:
    """A window on a map of ``shape``: ``None`` (the whole map) where it covers it."""
    if win is None or len(shape) != 3 or (win[0] >= shape[1] and win[1] >= shape[2]):
        return None
    return min(win[0], shape[1]), min(win[1], shape[2])


def _numel(shape: Shape, win: tuple[int, int] | None) -> int:
    """Entries of a row on a window ``win`` (``None``: the whole map) of a map of ``shape``."""
    if win is None or len(shape) != 3:
        return math.prod(shape)
    return shape[0] * min(win[0], shape[1]) * min(win[1], shape[2])


def unit_rows(shape: Shape, idx: Tensor, windowed: bool) -> Rows:
    """Rows ``+e_j`` then ``-e_j`` for neurons ``idx [n, 1 + len(shape)]`` (point, then position)."""
    n = len(idx)
    sign = torch.cat([torch.ones(n), -torch.ones(n)]).double()
    point = idx[:, 0].repeat(2)
    spec = torch.zeros(2 * n, dtype=torch.long)
    if windowed and len(shape) == 3:
        coef = torch.zeros(2 * n, shape[0], 1, 1, dtype=torch.float64)
        coef[torch.arange(2 * n), idx[:, 1].repeat(2), 0, 0] = sign
        return Rows(coef, point, spec, idx[:, 2:].repeat(2, 1))
    flat = torch.tensor([math.prod(shape[i + 1 :]) for i in range(len(shape))])
    pos = (idx[:, 1:] * flat).sum(1).repeat(2)
    coef = torch.zeros(2 * n, math.prod(shape), dtype=torch.float64)
    coef[torch.arange(2 * n), pos] = sign
    return Rows(coef.reshape(2 * n, *shape), point, spec)


def first_rows(graph: Graph, k: int, rows: Rows) -> tuple[int, Rows, Tensor | None]:
    """Unit rows on node ``k``'s output pulled through node ``k`` when that is a row of its weights
    (a dense layer; a convolution without groups or dilation): ``(node, rows on its output, d)``;
    else ``(k, rows, None)``."""
    op, below = graph.nodes[k].op, graph.nodes[k].inputs[0]
    sign = rows.coef.flatten(1).sum(1)  # each unit row holds one +-1
    if isinstance(op, Dense):
        pos = rows.coef.abs().argmax(1)
        return below, replace(rows, coef=op.w[pos] * sign[:, None]), op.bias[pos] * sign
    if isinstance(op, Conv) and rows.offset is not None and op.groups == 1 and op.dilation2 == (1, 1):
        c = rows.coef.abs().flatten(1).argmax(1)
        coef = op.w[c] * sign[:, None, None, None]
        offset = rows.offset * torch.tensor(op.stride2) - torch.tensor(op.pad2)
        return (
            below,
            fit(Rows(coef, rows.point, rows.spec, offset), op.in_shape, mask=True),
            op.bias[c, 0, 0] * sign,
        )
    return k, rows, None
