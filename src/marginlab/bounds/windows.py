"""Rows of linear bounds on a network's feature maps, each held only on its receptive-field *window*.

Backward bound propagation pulls rows ``a`` (one row: a linear function ``a . h`` of one point's feature
map ``h [C,H,W]``) through the layers. A row that starts at one neuron of a convolutional layer touches
only that neuron's receptive field at every layer below, a few hundred entries of maps of tens of
thousands: :class:`Rows` keeps, per row, the coefficients on a window ``[C, h, w]`` and the window's
top-left position ``offset`` in the map (the "patches" of auto_LiRPA, Xu et al. 2020). All rows of a
batch share the window size; their offsets differ. Rows that start at a fully connected layer cover the
whole map (``offset = None``).

Invariant: a window's entries outside the map are zero (they would multiply zero padding). Each
operation keeps it:

- convolution (stride ``s``, dilation ``d``, kernel ``k``, zero padding ``p``): the transposed
  convolution maps a window of size ``h`` at ``o`` to one of size ``(h - 1) s + d (k - 1) + 1`` at
  ``o s - p``; entries that fall into the padding are zeroed;
- ReLU, max-pooling, per-entry affine maps: their relaxations (:mod:`marginlab.bounds.ops`) are
  gathered at each row's window (its point, its positions) and applied entrywise;
- the sum of two branches' rows (a residual connection): both on the union of their windows.

A window at least as large as the map along an axis is cropped to the map, and a window covering the
whole map becomes a full row (``offset = None``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from marginlab.bounds.ops import Conv, Dense, MaxPool, Reshape, Scale, Shape


@dataclass(frozen=True)
class Rows:
    """``R`` rows on one node's output of per-sample ``shape``.

    ``coef``: ``[R, *shape]`` (full rows, ``offset is None``) or ``[R, C, h, w]`` on each row's window;
    ``offset [R, 2]`` (long): the window's top-left position in the map; ``point [R]`` (long): the
    point (index in the batch) each row belongs to; ``spec [R]`` (long): its index among that point's
    rows (per-row relaxation slopes, :mod:`marginlab.bounds.alpha`).
    """

    coef: Tensor
    point: Tensor
    spec: Tensor
    offset: Tensor | None = None

    def __len__(self) -> int:
        return len(self.coef)

    @property
    def size(self) -> tuple[int, int]:
        """The window's height and width (for a 3-D map)."""
        return int(self.coef.shape[2]), int(self.coef.shape[3])


def _shift(coef: Tensor, dim: int, delta: Tensor, size: int) -> Tensor:
    """``out[r, .., t, ..] = coef[r, .., t + delta[r], ..]`` along ``dim`` (2 or 3) for ``t < size``,
    zero where that index falls outside ``coef``."""
    src = torch.arange(size, device=coef.device)[None] + delta[:, None]  # [R, size]
    valid = (src >= 0) & (src < coef.shape[dim])
    view = [len(coef), 1, 1, 1]
    view[dim] = size
    idx = src.clamp(0, coef.shape[dim] - 1).view(view)
    shape = list(coef.shape)
    shape[dim] = size
    return coef.gather(dim, idx.expand(shape)) * valid.view(view).to(coef.dtype)


def reframe(coef: Tensor, old: Tensor, new: Tensor, size: tuple[int, int]) -> Tensor:
    """Window coefficients ``coef [R,C,h,w]`` at offsets ``old [R,2]`` moved onto windows of ``size`` at
    ``new [R,2]`` (entries outside the old window: zero; outside the new one: dropped)."""
    delta = new - old
    if coef.shape[2] != size[0] or bool((delta[:, 0] != 0).any()):
        coef = _shift(coef, 2, delta[:, 0], size[0])
    if coef.shape[3] != size[1] or bool((delta[:, 1] != 0).any()):
        coef = _shift(coef, 3, delta[:, 1], size[1])
    return coef


def full(rows: Rows, shape: Shape) -> Rows:
    """The same rows on the whole map ``shape`` (``offset = None``)."""
    if rows.offset is None:
        return rows
    zero = torch.zeros_like(rows.offset)
    return replace(rows, coef=reframe(rows.coef, rows.offset, zero, (shape[1], shape[2])), offset=None)


def fit(rows: Rows, shape: Shape, *, mask: bool) -> Rows:
    """Windowed rows on a map ``(C, H, W)``: entries outside the map zeroed (``mask``), axes where the
    window is at least the map cropped to it, and a window equal to the map made a full row."""
    assert rows.offset is not None
    coef, offset = rows.coef, rows.offset
    (h, w), (hh, ww) = rows.size, shape[1:]
    if mask:
        coef = _zero_outside(coef, offset, shape[1:])
    new = offset.clone()
    size = [h, w]
    for axis, n in ((0, hh), (1, ww)):
        if size[axis] >= n:
            new[:, axis], size[axis] = 0, n
    if size != [h, w] or not torch.equal(new, offset):
        coef = reframe(coef, offset, new, (size[0], size[1]))
    if size == [hh, ww]:
        return replace(rows, coef=coef, offset=None)
    return replace(rows, coef=coef, offset=new)


def gather(maps: Tensor, index: Tensor, rows: Rows) -> Tensor:
    """``maps [N, *shape]`` (per point, or ``N = 1``: shared) at each row's window: ``[R, *window]``.

    ``index [R]``: the map of each row. Positions outside the map read an arbitrary entry of it (the
    rows' coefficients are zero there)."""
    if rows.offset is None:
        return maps[index]
    (h, w), (hh, ww) = rows.size, maps.shape[2:]
    ys = (rows.offset[:, :1] + torch.arange(h, device=maps.device)[None]).clamp(0, hh - 1)  # [R,h]
    xs = (rows.offset[:, 1:] + torch.arange(w, device=maps.device)[None]).clamp(0, ww - 1)
    return maps.permute(0, 2, 3, 1)[index[:, None, None], ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)


def gather_masked(maps: Tensor, index: Tensor, rows: Rows) -> Tensor:
    """:func:`gather`, zero at the positions outside the map."""
    out = gather(maps, index, rows)
    return out if rows.offset is None else _zero_outside(out, rows.offset, tuple(maps.shape[2:]))


def _zero_outside(coef: Tensor, offset: Tensor, hw: Shape) -> Tensor:
    """``coef [R,C,h,w]`` on windows at ``offset [R,2]`` of a map of height and width ``hw``, with the
    entries outside the map set to zero."""
    h, w = coef.shape[2:]
    ys = offset[:, :1] + torch.arange(h, device=coef.device)[None]  # [R,h]
    xs = offset[:, 1:] + torch.arange(w, device=coef.device)[None]
    inside = ((ys >= 0) & (ys < hw[0]))[:, None, :, None] & ((xs >= 0) & (xs < hw[1]))[:, None, None, :]
    return coef * inside.to(coef.dtype)


def merge(a: Rows, b: Rows, shape: Shape) -> Rows:
    """``a + b``: the same rows (same order) from two branches, on the union of their windows."""
    if a.offset is None and b.offset is None:
        return replace(a, coef=a.coef + b.coef)
    a, b = (r if r.offset is not None else _as_window(r) for r in (a, b))
    assert a.offset is not None and b.offset is not None
    start = torch.minimum(a.offset, b.offset)
    ends = torch.maximum(a.offset + torch.tensor(a.size), b.offset + torch.tensor(b.size))
    hw = (ends - start).amax(0).tolist()
    size = (int(hw[0]), int(hw[1]))
    both = reframe(a.coef, a.offset, start, size) + reframe(b.coef, b.offset, start, size)
    return fit(replace(a, coef=both, offset=start), shape, mask=False)


def _as_window(rows: Rows) -> Rows:
    """Full rows of a 3-D map as windows at offset ``(0, 0)``."""
    return replace(rows, offset=torch.zeros(len(rows), 2, dtype=torch.long, device=rows.coef.device))


def conv_back(op: Conv, rows: Rows) -> tuple[Rows, Tensor]:
    """Rows on a convolution's output -> ``(rows on its input, offset d [R])`` (exact)."""
    d = rows.coef.sum((2, 3)) @ op.bias[:, 0, 0]  # the entries outside the map are zero
    coef = F.conv_transpose2d(rows.coef, op.w, None, op.stride2, 0, 0, op.groups, op.dilation2)
    offset = _as_window(rows).offset if rows.offset is None else rows.offset
    assert offset is not None
    stride, pad = torch.tensor(op.stride2), torch.tensor(op.pad2)
    return fit(replace(rows, coef=coef, offset=offset * stride - pad), op.in_shape, mask=True), d


def relu_back(rows: Rows, low: Tensor, up: Tensor, bias: Tensor) -> tuple[Rows, Tensor]:
    """Rows on ``relu(z)`` -> rows on ``z`` and ``d [R]``: ``low, up, bias`` are the per-row
    slopes / chord already gathered at the rows' windows (``[R, *window]``)."""
    neg = rows.coef.clamp(max=0)
    d = (neg * bias).flatten(1).sum(1)
    return replace(rows, coef=rows.coef.clamp(min=0) * low + neg * up), d


def pool_back(op: MaxPool, rows: Rows, relax: tuple[Tensor, Tensor, Tensor]) -> tuple[Rows, Tensor]:
    """Rows on a max-pooling's output -> rows on its input and ``d [R]``; ``relax``: the
    ``(star, dominated, top)`` of :meth:`MaxPool.relax`, each ``[B,*out]``."""
    star, dominated, top = (gather(t, rows.point, rows) for t in relax)
    neg = rows.coef.clamp(max=0)
    coef = rows.coef.clamp(min=0) + torch.where(dominated, neg, torch.zeros_like(neg))
    d = torch.where(dominated, torch.zeros_like(neg), neg * top).flatten(1).sum(1)
    (kh, kw), (sh, sw) = op.kernel, op.stride
    r, c, h, w = coef.shape
    cols = coef[:, :, None] * F.one_hot(star, kh * kw).permute(0, 1, 4, 2, 3).to(coef.dtype)
    size = ((h - 1) * sh + kh, (w - 1) * sw + kw)
    back = F.fold(cols.reshape(r, c * kh * kw, h * w), size, op.kernel, stride=op.stride)
    offset = _as_window(rows).offset if rows.offset is None else rows.offset
    assert offset is not None
    return fit(replace(rows, coef=back, offset=offset * torch.tensor(op.stride)), op.in_shape, mask=False), d


def affine_back(op: Dense | Scale | Reshape, rows: Rows) -> tuple[Rows, Tensor]:
    """Rows on a dense, per-entry or reshaping affine map's output -> rows on its input, ``d [R]``."""
    if isinstance(op, Scale):
        s, c = (t[None] for t in (op.s, op.bias))
        zero = torch.zeros(len(rows), dtype=torch.long, device=rows.coef.device)
        return replace(rows, coef=rows.coef * gather(s, zero, rows)), (
            rows.coef * gather(c, zero, rows)
        ).flatten(1).sum(1)
    rows = full(rows, op.out_shape)
    if isinstance(op, Dense):
        return replace(rows, coef=rows.coef @ op.w), rows.coef @ op.bias
    d = torch.zeros(len(rows), dtype=rows.coef.dtype, device=rows.coef.device)
    return replace(rows, coef=rows.coef.reshape(len(rows), *op.in_shape)), d
