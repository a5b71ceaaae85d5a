"""Linear bound propagation (CROWN / DeepPoly-style) and interval bounds for ReLU networks (CPU, float64).

A network is turned into a list of operations on one sample's tensor (shapes without the batch):
affine maps (``Dense``, ``Conv``, ``Scale`` for a per-channel ``(x - mean) / std``, ``Reshape``), ``ReLU``
and ``MaxPool``. For an input set ``X`` (an Lp ball of radius ``eps`` around ``x0``, optionally intersected
with the image box [0,1]^d: see :class:`InputSet`) and a specification ``C [B,S,K]`` on the logits,
:func:`lower_bounds` returns ``L [B,S]`` with ``L <= min_{x in X} C f(x)`` (certified, in float64).

How (Zhang et al. 2018, "CROWN"; Singh et al. 2019, "DeepPoly"): walking backward from the output, the
row vector ``A`` of a linear function of the current layer is pulled through each layer,
- affine ``z = M h + c``: ``A z = (A M) h + A c`` (exact);
- ReLU with pre-activation bounds ``l <= z <= u``: positive entries of ``A`` use the lower relaxation
  ``relu(z) >= s z`` (``s`` = 1 if ``u > -l`` else 0, the adaptive CROWN choice), negative entries the
  upper chord ``relu(z) <= u (z - l) / (u - l)``; stable neurons are exact;
- max-pooling (DeepPoly's relaxation): ``max_j z_j >= z_{j*}`` with ``j*`` the input of largest lower
  bound, and ``max_j z_j <= max_j u_j``, or ``= z_{j*}`` when ``l_{j*} >= u_j`` for every other ``j``;
until ``A`` is a function of the input, minimised over ``X`` in closed form (:meth:`InputSet.concretize`).
The ReLU relaxations need bounds on every pre-activation: :func:`layer_bounds` computes them layer by
layer, by interval arithmetic (IBP) always and by the same backward pass (identity specification, one
row per neuron) where (neurons of the layer) x (widest layer below it) <= ``crown_budget``, keeping the
tighter of the two. Convolutional layers of image nets have tens of thousands of neurons, so by default
their bounds come from IBP (the backward pass per neuron would cost minutes per point on a CPU); the
first layer is exact anyway. IBP bounds grow quickly with depth: on a CNN the result can be no better
than the global Lipschitz bound (docs/bounds.md has measurements).

auto_LiRPA, the reference implementation, pins torch<1.13 and cannot be installed beside this
project's torch, hence this hand-written version of the parts needed here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.errors import ConfigError

Shape = tuple[int, ...]
DOMAINS = ("box", "rd")
# Floats of one backward pass held at once (A [B, S, n]); chunks of neurons are sized to fit.
_BUDGET = 1 << 24
# Backward-propagated bounds for a layer of n neurons cost about n times the widest layer below it:
# affordable for MLPs (784-1024-1024: 2^20), not for the conv layers of an image CNN (2^28 and more).
CROWN_BUDGET = 1 << 22


def parse_domain(domain: str) -> str:
    """``"box"`` (the image box [0,1]^d, default for images) or ``"rd"`` (all of R^d; ``"R^d"`` too)."""
    text = str(domain).strip().lower().replace("^", "")
    if text not in DOMAINS:
        raise ConfigError(f"unknown margin domain {domain!r}; use 'box' ([0,1]^d) or 'rd' (R^d)")
    return text


# ---------------------------------------------------------------------------------------------- input sets
@dataclass(frozen=True)
class InputSet:
    """``{x : ||x - x0||_p <= eps}``, intersected with [0,1]^d when ``box``. ``x0 [B,D]``, ``eps [B]``."""

    x0: Tensor
    eps: Tensor
    p: float
    box: bool

    def interval(self) -> tuple[Tensor, Tensor]:
        """Per-coordinate bounds ``(l, u)`` ``[B,D]``: ``|x_i - x0_i| <= ||x - x0||_p`` for every p."""
        e = self.eps[:, None]
        lo, hi = self.x0 - e, self.x0 + e
        if self.box:
            lo, hi = lo.clamp(0.0, 1.0), hi.clamp(0.0, 1.0)
        return lo, hi

    def concretize(self, a: Tensor) -> Tensor:
        """Lower bound ``[B,S]`` of ``a [B,S,D] . x`` over the set (exact unless ``box`` and ``p = 2``)."""
        lo, hi = self.interval()
        box_bound = _box_min(a, lo, hi)
        if self.p == math.inf:
            return box_bound  # the L-inf ball (and its intersection with the box) is a box
        ball = _ball_min(a, self.x0, self.eps, self.p)
        if not self.box:
            return ball
        return torch.maximum(torch.maximum(ball, box_bound), self._dual_l2_box(a))

    def _dual_l2_box(self, a: Tensor, grid: int = 25) -> Tensor:
        """Weak duality for ``min a.x`` s.t. ``||x - x0||_2 <= eps``, ``0 <= x <= 1``: for every ``lam > 0``,
        ``g(lam) = min_{x in box} a.x + lam (||x - x0||^2 - eps^2)`` is a lower bound, and the inner
        minimum is separable (``x_i = clip(x0_i - a_i / (2 lam))``). A geometric grid of ``lam`` around
        the ball's own multiplier ``||a|| / (2 eps)`` gets close to the best one."""
        x0, eps = self.x0[:, None, :], self.eps[:, None]
        if not bool(torch.isfinite(eps).all()):
            return torch.full(a.shape[:2], -math.inf, dtype=a.dtype, device=a.device)
        base = a.norm(dim=2).clamp_min(1e-300) / (2 * eps.clamp_min(1e-300))
        best = torch.full(a.shape[:2], -math.inf, dtype=a.dtype, device=a.device)
        for k in torch.linspace(-6, 3, grid).tolist():
            lam = base * (2.0**k)
            x = (x0 - a / (2 * lam[..., None])).clamp(0.0, 1.0)
            g = (a * x).sum(2) + lam * ((x - x0).square().sum(2) - eps.square())
            best = torch.maximum(best, g)
        return best


def _box_min(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``min_{lo <= x <= hi} a . x`` -> ``[B,S]`` for ``a [B,S,D]``, ``lo, hi [B,D]``."""
    return (a.clamp(min=0) * lo[:, None, :] + a.clamp(max=0) * hi[:, None, :]).sum(2)


def _ball_min(a: Tensor, x0: Tensor, eps: Tensor, p: float) -> Tensor:
    """``min_{||x - x0||_p <= eps} a . x = a . x0 - eps ||a||_q`` -> ``[B,S]`` (Hoelder)."""
    q = 1.0 if p == math.inf else 2.0
    norm = torch.linalg.vector_norm(a, ord=q, dim=2)
    radius = torch.where(norm > 0, eps[:, None] * norm, torch.zeros_like(norm))  # inf * 0 -> 0
    return (a * x0[:, None, :]).sum(2) - radius


# ------------------------------------------------------------------------------------------------ operations
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
        return self.lin(x) + self.bias

    def ibp(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        center, radius = self.forward((lo + hi) / 2), self.abs_lin((hi - lo) / 2)
        return center - radius, center + radius

    def backward(self, a: Tensor, bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        b, s = a.shape[:2]
        d = (a.flatten(2) * self.bias.flatten()).sum(2)
        return self.transpose(a.reshape(b * s, *self.out_shape)).reshape(b, s, *self.in_shape), d


class Dense(Affine):
    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.w = weight.detach().cpu().double()
        self.bias = bias.detach().cpu().double() if bias is not None else torch.zeros(len(self.w)).double()
        self.in_shape, self.out_shape = (self.w.shape[1],), (self.w.shape[0],)

    def lin(self, x: Tensor) -> Tensor:
        return x @ self.w.T

    def abs_lin(self, x: Tensor) -> Tensor:
        return x @ self.w.abs().T

    def sq_lin(self, x: Tensor) -> Tensor:
        return x @ self.w.square().T

    def transpose(self, a: Tensor) -> Tensor:
        return a @ self.w


class Conv(Affine):
    """A 2-D convolution (also average pooling, as a depthwise convolution with constant weights)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, in_shape: Shape, **kw: object) -> None:
        self.w, self.kw, self.in_shape = weight.detach().cpu().double(), kw, in_shape
        out = F.conv2d(torch.zeros(1, *in_shape, dtype=torch.float64), self.w, **kw)  # type: ignore[arg-type]
        self.out_shape = tuple(out.shape[1:])
        b = bias.detach().cpu().double() if bias is not None else torch.zeros(len(self.w)).double()
        self.bias = b[:, None, None].expand(self.out_shape).contiguous()

    def lin(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w, **self.kw)  # type: ignore[arg-type]

    def abs_lin(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w.abs(), **self.kw)  # type: ignore[arg-type]

    def sq_lin(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w.square(), **self.kw)  # type: ignore[arg-type]

    def transpose(self, a: Tensor) -> Tensor:
        return torch.nn.grad.conv2d_input((len(a), *self.in_shape), self.w, a, **self.kw)  # type: ignore[arg-type]


class Scale(Affine):
    """Entrywise ``x * s + c`` (a per-channel normalisation ``(x - mean) / std``); ``s, c`` broadcast."""

    diagonal = True

    def __init__(self, s: Tensor, c: Tensor, shape: Shape) -> None:
        self.s = s.double().expand(shape).contiguous()
        self.bias = c.double().expand(shape).contiguous()
        self.in_shape = self.out_shape = shape

    def lin(self, x: Tensor) -> Tensor:
        return x * self.s

    def abs_lin(self, x: Tensor) -> Tensor:
        return x * self.s.abs()

    def sq_lin(self, x: Tensor) -> Tensor:
        return x * self.s.square()

    def transpose(self, a: Tensor) -> Tensor:
        return a * self.s


class Reshape(Affine):
    diagonal = True

    def __init__(self, in_shape: Shape, out_shape: Shape) -> None:
        self.in_shape, self.out_shape = in_shape, out_shape
        self.bias = torch.zeros(out_shape, dtype=torch.float64)

    def lin(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), *self.out_shape)

    abs_lin = sq_lin = lin

    def transpose(self, a: Tensor) -> Tensor:
        return a.reshape(len(a), *self.in_shape)


class ReLU(Op):
    def __init__(self, shape: Shape) -> None:
        self.in_shape = self.out_shape = shape

    def ibp(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return lo.clamp(min=0), hi.clamp(min=0)

    def backward(self, a: Tensor, bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        assert bounds is not None
        lo, hi = (t[:, None] for t in bounds)  # [B,1,*shape]
        unstable = (lo < 0) & (hi > 0)
        chord = torch.where(unstable, hi / (hi - lo).clamp_min(1e-300), (lo >= 0).double())
        low_slope = torch.where(unstable, (hi > -lo).double(), (lo >= 0).double())
        neg = a.clamp(max=0)
        d = (neg * torch.where(unstable, -chord * lo, torch.zeros_like(lo))).flatten(2).sum(2)
        return a.clamp(min=0) * low_slope + neg * chord, d


class MaxPool(Op):
    """2-D max-pooling without padding (DeepPoly's relaxation; see the module docstring)."""

    def __init__(self, in_shape: Shape, kernel: tuple[int, int], stride: tuple[int, int]) -> None:
        self.in_shape, self.kernel, self.stride = in_shape, kernel, stride
        c, h, w = in_shape
        self.out_shape = (c, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)

    def ibp(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return F.max_pool2d(lo, self.kernel, self.stride), F.max_pool2d(hi, self.kernel, self.stride)

    def windows(self, t: Tensor) -> Tensor:
        """``[N,C,H,W]`` -> ``[N,C,k*k,L]``: the entries of every pooling window."""
        windows = self.out_shape[1] * self.out_shape[2]
        return F.unfold(t, self.kernel, stride=self.stride).reshape(len(t), self.in_shape[0], -1, windows)

    def backward(self, a: Tensor, bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        assert bounds is not None
        lw, uw = self.windows(bounds[0]), self.windows(bounds[1])  # [B,C,kk,L]
        kk = lw.shape[2]
        low_max, star = lw.max(dim=2)  # [B,C,L]
        onehot = F.one_hot(star, kk).permute(0, 1, 3, 2).double()  # [B,C,kk,L]
        others = uw.masked_fill(onehot.bool(), -math.inf).amax(dim=2)
        dominated = low_max >= others  # the max is that input, exactly
        b, s = a.shape[:2]
        a = a.reshape(b, s, *lw.shape[1:2], -1)  # [B,S,C,L]
        neg = a.clamp(max=0)
        coef = a.clamp(min=0) + torch.where(dominated[:, None], neg, torch.zeros_like(neg))
        d = torch.where(dominated[:, None], torch.zeros_like(neg), neg * uw.amax(dim=2)[:, None]).sum((2, 3))
        cols = (coef[:, :, :, None, :] * onehot[:, None]).reshape(b * s, -1, lw.shape[-1])
        back = F.fold(cols, self.in_shape[1:], self.kernel, stride=self.stride)
        return back.reshape(b, s, *self.in_shape), d


# ------------------------------------------------------------------------------------------ network parsing
_SKIP = (nn.Identity, nn.Dropout)
SUPPORTED = "Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, Identity, Dropout, a (x-mean)/std module"


def _leaves(module: nn.Module) -> list[nn.Module]:
    from marginlab.models import MarginNet  # local import: models does not depend on bounds

    if isinstance(module, MarginNet):
        return [*_leaves(module.phi), module.head]
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _normalize_op(module: nn.Module, shape: Shape) -> Scale:
    """A module with ``mean`` and ``std`` tensors computing ``(x - mean) / std`` (checked on a sample)."""
    mean, std = (torch.as_tensor(getattr(module, k)).detach().cpu().double() for k in ("mean", "std"))
    if len(shape) == 3 and mean.numel() in (1, shape[0]):  # per channel (one value: every channel)
        mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
    op = Scale(1.0 / std, -mean / std, shape)
    probe = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = module(probe.to(module.mean.device)).double().cpu()
    if not torch.allclose(got, op.forward(probe.double()), rtol=1e-4, atol=1e-5):
        raise ConfigError(f"{type(module).__name__} has mean/std but does not compute (x - mean) / std")
    return op


def _op(module: nn.Module, shape: Shape) -> Op | None:
    """The operation of one leaf module on inputs of per-sample ``shape`` (``None``: the identity)."""
    if isinstance(module, _SKIP):
        return None
    if isinstance(module, nn.Linear):
        return Dense(module.weight, module.bias)
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise ConfigError("bound propagation supports nn.Flatten() with its default dimensions only")
        return Reshape(shape, (math.prod(shape),))
    if isinstance(module, nn.ReLU):
        return ReLU(shape)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ConfigError("bound propagation supports Conv2d with zero padding only")
        kw = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
        return Conv(module.weight, module.bias, shape, groups=module.groups, **kw)
    if isinstance(module, nn.MaxPool2d):
        if _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1) or module.ceil_mode:
            raise ConfigError("bound propagation supports MaxPool2d without padding, dilation or ceil_mode")
        stride = _pair(module.stride if module.stride is not None else module.kernel_size)
        return MaxPool(shape, _pair(module.kernel_size), stride)
    if isinstance(module, nn.AvgPool2d):
        k, pad = _pair(module.kernel_size), _pair(module.padding)
        if module.ceil_mode or module.divisor_override or (pad != (0, 0) and not module.count_include_pad):
            raise ConfigError("bound propagation supports AvgPool2d without ceil_mode or divisor_override")
        c = shape[0]
        weight = torch.full((c, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
        stride = _pair(module.stride if module.stride is not None else module.kernel_size)
        return Conv(weight, None, shape, stride=stride, padding=pad, groups=c)
    if isinstance(getattr(module, "mean", None), Tensor) and isinstance(getattr(module, "std", None), Tensor):
        return _normalize_op(module, shape)
    raise ConfigError(
        f"bound propagation cannot handle layer {type(module).__name__}; supported: {SUPPORTED}"
    )


def network_ops(model: nn.Module, in_shape: Sequence[int]) -> list[Op]:
    """The operations of a MarginNet or ``nn.Sequential`` (nesting allowed) on inputs ``[N,*in_shape]``."""
    ops: list[Op] = []
    shape: Shape = tuple(int(s) for s in in_shape)
    for module in _leaves(model):
        op = _op(module, shape)
        if op is not None:
            ops.append(op)
            shape = op.out_shape
    if not ops or not isinstance(ops[-1], Affine):
        raise ConfigError("bound propagation needs a network ending in a linear layer")
    return ops


# ------------------------------------------------------------------------------------------ propagation
def _backward(
    ops: Sequence[Op], bounds: dict[int, tuple[Tensor, Tensor]], a: Tensor, inset: InputSet
) -> Tensor:
    """Lower bound ``[B,S]`` of ``a [B,S,*out of ops[-1]] . ops(x)`` over ``inset``."""
    d = torch.zeros(a.shape[:2], dtype=torch.float64, device=a.device)
    for i in range(len(ops) - 1, -1, -1):
        a, di = ops[i].backward(a, bounds.get(i))
        d = d + di
    return inset.concretize(a.flatten(2)) + d


def _crown_neuron_bounds(
    ops: Sequence[Op], bounds: dict[int, tuple[Tensor, Tensor]], inset: InputSet
) -> tuple[Tensor, Tensor]:
    """Bounds ``[B,*out]`` of every output neuron of ``ops`` (identity specification, in chunks)."""
    shape = ops[-1].out_shape
    n, b = math.prod(shape), len(inset.x0)
    widest = max(math.prod(op.in_shape) for op in ops)
    chunk = max(1, min(n, _BUDGET // (2 * b * widest)))
    eye = torch.eye(n, dtype=torch.float64, device=inset.x0.device)
    lows, highs = [], []
    for start in range(0, n, chunk):
        rows = eye[start : start + chunk]
        spec = torch.cat([rows, -rows]).expand(b, -1, -1).reshape(b, -1, *shape)
        low = _backward(ops, bounds, spec, inset)
        lows.append(low[:, : len(rows)])
        highs.append(-low[:, len(rows) :])
    return torch.cat(lows, 1).reshape(b, *shape), torch.cat(highs, 1).reshape(b, *shape)


def _first_block_bounds(ops: Sequence[Op], in_shape: Shape, inset: InputSet) -> tuple[Tensor, Tensor]:
    """Bounds at the output of the affine ops before the first nonlinearity, exact for L-inf sets and for
    the L2 ball when at most one op is not diagonal (else interval arithmetic, which stays sound)."""
    b = len(inset.x0)
    lo, hi = (t.reshape(b, *in_shape) for t in inset.interval())
    for op in ops:
        lo, hi = op.ibp(lo, hi)
    general = sum(not op.diagonal for op in ops if isinstance(op, Affine))
    if inset.p == 2.0 and general <= 1:
        center = inset.x0.reshape(b, *in_shape)
        sq = torch.ones_like(center)
        for op in ops:
            assert isinstance(op, Affine)
            center, sq = op.forward(center), op.sq_lin(sq)
        radius = sq.sqrt() * inset.eps.reshape(b, *[1] * (sq.dim() - 1))
        radius = torch.where(sq > 0, radius, torch.zeros_like(radius))
        lo, hi = torch.maximum(lo, center - radius), torch.minimum(hi, center + radius)
    return lo, hi


def layer_bounds(
    ops: Sequence[Op], inset: InputSet, *, crown_budget: int = CROWN_BUDGET
) -> dict[int, tuple[Tensor, Tensor]]:
    """``{i: (l, u)}``, each ``[B,*ops[i].in_shape]``: bounds at the input of every nonlinear ``ops[i]``."""
    bounds: dict[int, tuple[Tensor, Tensor]] = {}
    for i, op in enumerate(ops):
        if isinstance(op, Affine):
            continue
        if not bounds:
            lo, hi = _first_block_bounds(ops[:i], ops[0].in_shape, inset)
        else:
            j = max(bounds)  # the previous nonlinearity: interval arithmetic from its bounds
            lo, hi = ops[j].ibp(*bounds[j])
            for k in range(j + 1, i):
                lo, hi = ops[k].ibp(lo, hi)
            widest = max(math.prod(o.in_shape) for o in ops[:i])
            if math.prod(op.in_shape) * widest <= crown_budget:  # the cost of one backward pass per neuron
                cl, ch = _crown_neuron_bounds(ops[:i], bounds, inset)
                lo, hi = torch.maximum(lo, cl), torch.minimum(hi, ch)
        bounds[i] = (lo, hi)
    return bounds


def lower_bounds(
    ops: Sequence[Op],
    x0: Tensor,
    eps: Tensor,
    spec: Tensor,
    *,
    p: float,
    box: bool,
    crown_budget: int = CROWN_BUDGET,
) -> Tensor:
    """Certified ``L [B,S] <= min_{x in X} spec f(x)`` for ``x0 [B,*in]``, ``eps [B]``, ``spec [B,S,K]``."""
    inset = InputSet(x0.double().flatten(1), eps.double(), p, box)
    bounds = layer_bounds(ops, inset, crown_budget=crown_budget)
    return _backward(ops, bounds, spec.double(), inset)


def margin_spec(y: Tensor, num_classes: int, sign: Tensor) -> Tensor:
    """``[B,K-1,K]``: rows ``sign * (e_y - e_k)`` for every ``k != y`` (``sign [B]`` of +-1)."""
    eye = torch.eye(num_classes, dtype=torch.float64, device=y.device)
    rows = eye[y][:, None, :] - eye[None, :, :]  # [B,K,K]
    keep = ~torch.eye(num_classes, dtype=torch.bool, device=y.device)[y]  # drop k = y
    return rows[keep].reshape(len(y), num_classes - 1, num_classes) * sign[:, None, None].double()
