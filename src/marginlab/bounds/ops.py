"""The layers of a network as operations on one sample's tensor, each with its interval image and its
linear relaxation (CROWN: Zhang et al. 2018; DeepPoly: Singh et al. 2019). CPU, float64.

An :class:`Op` maps ``[N, *in_shape]`` to ``[N, *out_shape]`` (shapes without the batch) and knows two
things about itself:

- ``ibp``: the interval image of a box ``[lo, hi]`` (interval bound propagation);
- ``backward``: given the rows ``A`` of a linear function of its output and bounds ``l <= z <= u`` on its
  input, rows ``A'`` and an offset ``d`` with ``A op(z) >= A' z + d`` for every ``z`` in the bounds.

The relaxations, per operation:

- affine ``z -> M z + c`` (:class:`Dense`, :class:`Conv`, :class:`Scale` for a per-channel
  ``(x - mean) / std``, :class:`Reshape`): ``A (M z + c) = (A M) z + A c``, exact; its interval image is
  ``M (lo + hi) / 2 + c  ±  |M| (hi - lo) / 2``;
- :class:`ReLU` with ``l <= z <= u``: positive entries of ``A`` use the lower relaxation ``relu(z) >= s z``
  (``s = 1`` if ``u > -l`` else 0, the adaptive CROWN choice), negative entries the upper chord
  ``relu(z) <= u (z - l) / (u - l)``; stable neurons (``l >= 0`` or ``u <= 0``) are exact;
- :class:`MaxPool` (DeepPoly's relaxation): ``max_j z_j >= z_{j*}`` with ``j*`` the input of largest lower
  bound, and ``max_j z_j <= max_j u_j``, or ``= z_{j*}`` when ``l_{j*} >= u_j`` for every other ``j``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input

Shape = tuple[int, ...]


def _pair(v: int | tuple[int, ...] | str) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(1, 2)`` stays."""
    if isinstance(v, str):
        raise ValueError(f"not a number or pair: {v!r}")
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Op(ABC):
    """One layer acting on ``[N, *in_shape]``; ``backward`` pulls a lower-bound row ``A`` through it."""

    in_shape: Shape
    out_shape: Shape

    @abstractmethod
    def ibp(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Interval image ``[N,*out]`` of the box ``[lo, hi]`` ``[N,*in]``."""

    @abstractmethod
    def backward(self, a: Tensor, bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``A [B,S,*out]`` -> ``(A' [B,S,*in], d [B,S])`` with ``A op(h) >= A' h + d`` on the bounds."""


class Affine(Op):
    """``h -> M h + c``; ``diagonal`` when ``M`` scales or permutes coordinates (``|.|`` commutes with it)."""

    diagonal = False
    bias: Tensor  # [*out]: the image of 0

    @abstractmethod
    def lin(self, x: Tensor) -> Tensor:
        """``M x`` for ``x [N,*in]``."""

    @abstractmethod
    def abs_lin(self, x: Tensor) -> Tensor:
        """``|M| x`` (entrywise absolute value of the matrix)."""

    @abstractmethod
    def sq_lin(self, x: Tensor) -> Tensor:
        """``(M * M) x`` (entrywise square): ``sqrt`` of it on ones gives the rows' L2 norms."""

    @abstractmethod
    def transpose(self, a: Tensor) -> Tensor:
        """``a M`` for rows ``a [N,*out]`` -> ``[N,*in]``."""

    def forward(self, x: Tensor) -> Tensor:
        """``M x + c``: ``[N,*in]`` -> ``[N,*out]``."""
        return self.lin(x) + self.bias

    def ibp(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Centre ``M (lo + hi) / 2 + c`` plus or minus ``|M| (hi - lo) / 2``, each ``[N,*out]``."""
        center, radius = self.forward((lo + hi) / 2), self.abs_lin((hi - lo) / 2)
        return center - radius, center + radius

    def backward(self, a: Tensor, bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Exact: ``(A M [B,S,*in], A c [B,S])``; ``bounds`` are not needed."""
        b, s = a.shape[:2]
        d = (a.flatten(2) * self.bias.flatten()).sum(2)
        return self.transpose(a.reshape(b * s, *self.out_shape)).reshape(b, s, *self.in_shape), d


class Dense(Affine):
    """A fully connected layer ``h -> W h + b``: ``weight [out, in]``, ``bias [out]`` (``None``: zero)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.w = weight.detach().cpu().double()
        self.bias = bias.detach().cpu().double() if bias is not None else torch.zeros(len(self.w)).double()
        self.in_shape, self.out_shape = (self.w.shape[1],), (self.w.shape[0],)

    def lin(self, x: Tensor) -> Tensor:
        """``W x``: ``[N,in]`` -> ``[N,out]``."""
        return x @ self.w.T

    def abs_lin(self, x: Tensor) -> Tensor:
        """``|W| x``: ``[N,in]`` -> ``[N,out]``."""
        return x @ self.w.abs().T

    def sq_lin(self, x: Tensor) -> Tensor:
        """``(W * W) x``: ``[N,in]`` -> ``[N,out]``."""
        return x @ self.w.square().T

    def transpose(self, a: Tensor) -> Tensor:
        """``a W``: ``[N,out]`` -> ``[N,in]``."""
        return a @ self.w


class Conv(Affine):
    """A 2-D convolution (also average pooling, as a depthwise convolution with constant weights).

    ``weight [C_out, C_in / groups, kh, kw]``, ``bias [C_out]`` (``None``: zero), ``in_shape (C, H, W)``;
    ``stride``, ``padding``, ``dilation`` and ``groups`` as in ``F.conv2d``.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        in_shape: Shape,
        *,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
    ) -> None:
        self.w, self.in_shape = weight.detach().cpu().double(), in_shape
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        # as pairs, and the zero padding before the first row / column ("same": PyTorch pads the
        # smaller half there), for the windows of bounds/windows.py
        self.stride2, self.dilation2 = _pair(stride), _pair(dilation)
        kernel = (int(self.w.shape[2]), int(self.w.shape[3]))
        if padding == "same":
            self.pad2 = tuple((d * (k - 1)) // 2 for d, k in zip(self.dilation2, kernel, strict=True))
        else:
            self.pad2 = (0, 0) if padding == "valid" else _pair(padding)
        self.out_shape = tuple(self.lin(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
        b = bias.detach().cpu().double() if bias is not None else torch.zeros(len(self.w)).double()
        self.bias = b[:, None, None].expand(self.out_shape).contiguous()

    def lin(self, x: Tensor) -> Tensor:
        """The convolution without bias: ``[N,*in]`` -> ``[N,*out]``."""
        return self._conv(x, self.w)

    def abs_lin(self, x: Tensor) -> Tensor:
        """The convolution with ``|weight|``: ``[N,*in]`` -> ``[N,*out]``."""
        return self._conv(x, self.w.abs())

    def sq_lin(self, x: Tensor) -> Tensor:
        """The convolution with ``weight ** 2``: ``[N,*in]`` -> ``[N,*out]``."""
        return self._conv(x, self.w.square())

    def transpose(self, a: Tensor) -> Tensor:
        """The transposed convolution: ``[N,*out]`` -> ``[N,*in]``."""
        shape = [len(a), *self.in_shape]
        return conv2d_input(shape, self.w, a, self.stride, self.padding, self.dilation, self.groups)

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)


class Scale(Affine):
    """Entrywise ``x * s + c`` (a per-channel normalisation ``(x - mean) / std``); ``s, c`` broadcast."""

    diagonal = True

    def __init__(self, s: Tensor, c: Tensor, shape: Shape) -> None:
        self.s = s.double().expand(shape).contiguous()
        self.bias = c.double().expand(shape).contiguous()
        self.in_shape = self.out_shape = shape

    def lin(self, x: Tensor) -> Tensor:
        """``x * s``: ``[N,*shape]`` -> ``[N,*shape]``."""
        return x * self.s

    def abs_lin(self, x: Tensor) -> Tensor:
        """``x * |s|``."""
        return x * self.s.abs()

    def sq_lin(self, x: Tensor) -> Tensor:
        """``x * s ** 2``."""
        return x * self.s.square()

    def transpose(self, a: Tensor) -> Tensor:
        """``a * s`` (a diagonal matrix is its own transpose)."""
        return a * self.s


class Reshape(Affine):
    """``[N,*in_shape]`` -> ``[N,*out_shape]``, the same entries (``nn.Flatten``): a permutation matrix."""

    diagonal = True

    def __init__(self, in_shape: Shape, out_shape: Shape) -> None:
        self.in_shape, self.out_shape = in_shape, out_shape
        self.bias = torch.zeros(out_shape, dtype=torch.float64)

    def lin(self, x: Tensor) -> Tensor:
        """``[N,*in]`` -> ``[N,*out]`` (also ``abs_lin`` and ``sq_lin``: the matrix holds ones)."""
        return x.reshape(len(x), *self.out_shape)

    abs_lin = sq_lin = lin

    def transpose(self, a: Tensor) -> Tensor:
        """``[N,*out]`` -> ``[N,*in]``."""
        return a.reshape(len(a), *self.in_shape)


class ReLU(Op):
    """``max(z, 0)`` entrywise on ``[N,*shape]``, relaxed as in the module docstring."""

    def __init__(self, shape: Shape) -> None:
        self.in_shape = self.out_shape = shape

    def ibp(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """``(relu(lo), relu(hi))``, each ``[N,*shape]``."""
        return lo.clamp(min=0), hi.clamp(min=0)

    @staticmethod
    def relax(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(s, c, b)``, each shaped like ``lo``: ``s z <= relu(z) <= c z + b`` on ``[lo, hi]`` (lower
        slope ``s`` of the adaptive CROWN choice, the chord ``c z + b``; exact where stable)."""
        unstable = (lo < 0) & (hi > 0)
        active = (lo >= 0).to(lo.dtype)
        chord = torch.where(unstable, hi / (hi - lo).clamp_min(1e-300), active)
        low_slope = torch.where(unstable, (hi > -lo).to(lo.dtype), active)
        return low_slope, chord, torch.where(unstable, -chord * lo, torch.zeros_like(lo))

    def backward(self, a: Tensor, bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``A [B,S,*shape]`` -> ``(A' [B,S,*shape], d [B,S])`` given the pre-activation bounds
        ``(l, u)`` ``[B,*shape]``: lower slope ``s`` for ``A > 0``, chord for ``A < 0``."""
        assert bounds is not None
        low_slope, chord, intercept = (t[:, None] for t in self.relax(*bounds))  # [B,1,*shape]
        neg = a.clamp(max=0)
        d = (neg * intercept).flatten(2).sum(2)
        return a.clamp(min=0) * low_slope + neg * chord, d


class MaxPool(Op):
    """2-D max-pooling without padding on ``(C, H, W)`` (DeepPoly's relaxation; see the module docstring)."""

    def __init__(self, in_shape: Shape, kernel: tuple[int, int], stride: tuple[int, int]) -> None:
        self.in_shape, self.kernel, self.stride = in_shape, kernel, stride
        c, h, w = in_shape
        self.out_shape = (c, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)

    def ibp(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """``(maxpool(lo), maxpool(hi))``, each ``[N,*out]``."""
        return F.max_pool2d(lo, self.kernel, self.stride), F.max_pool2d(hi, self.kernel, self.stride)

    def windows(self, t: Tensor) -> Tensor:
        """``[N,C,H,W]`` -> ``[N,C,k*k,L]``: the entries of every pooling window."""
        windows = self.out_shape[1] * self.out_shape[2]
        return F.unfold(t, self.kernel, stride=self.stride).reshape(len(t), self.in_shape[0], -1, windows)

    def relax(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(star, dominated, top)``, each ``[B,*out]``, for input bounds ``lo, hi [B,*in]``: the
        window entry ``star`` (0 .. kh*kw-1) of largest lower bound, so ``max >= z_star``; whether it is
        the maximum for sure (``max = z_star``); ``top``, the largest upper bound (``max <= top``)."""
        lw, uw = self.windows(lo), self.windows(hi)  # [B,C,kk,L]
        low_max, star = lw.max(dim=2)  # [B,C,L]
        others = uw.scatter(2, star[:, :, None], -math.inf).amax(dim=2)
        out = (len(lo), *self.out_shape)
        return star.reshape(out), (low_max >= others).reshape(out), uw.amax(dim=2).reshape(out)

    def backward(self, a: Tensor, bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``A [B,S,*out]`` -> ``(A' [B,S,*in], d [B,S])`` given the input bounds ``(l, u)`` ``[B,*in]``."""
        assert bounds is not None
        star, dominated, top = (t.flatten(2) for t in self.relax(*bounds))  # [B,C,L]
        kk = self.kernel[0] * self.kernel[1]
        onehot = F.one_hot(star, kk).permute(0, 1, 3, 2).double()  # [B,C,kk,L]
        b, s = a.shape[:2]
        a = a.reshape(b, s, *star.shape[1:])  # [B,S,C,L]
        neg = a.clamp(max=0)
        coef = a.clamp(min=0) + torch.where(dominated[:, None], neg, torch.zeros_like(neg))
        d = torch.where(dominated[:, None], torch.zeros_like(neg), neg * top[:, None]).sum((2, 3))
        cols = (coef[:, :, :, None, :] * onehot[:, None]).reshape(b * s, -1, star.shape[-1])
        back = F.fold(cols, self.in_shape[1:], self.kernel, stride=self.stride)
        return back.reshape(b, s, *self.in_shape), d
