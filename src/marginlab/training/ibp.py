"""Differentiable bounds of the margin specification for certified training: interval bound propagation
(IBP; Gowal et al. 2018) and CROWN-IBP's backward pass (Zhang et al. 2020), float32, batched, on the
device, with gradients to every weight.

:mod:`marginlab.bounds` computes the same kind of bounds for *verification*: on a float64 copy of the
network, detached from its weights. Training back-propagates through the bounds, so they are computed
here on the model's own layers (:func:`chain_layers`: a :class:`~marginlab.nets.models.MarginNet` or
nested ``nn.Sequential`` of Linear, Conv2d, ReLU, Flatten, MaxPool2d, Dropout (the identity in bounds),
Identity), with the relaxations of :mod:`marginlab.bounds.ops` (the tests check that both agree).

For inputs ``x0 [B,*in]`` in the set ``X`` (:class:`TrainingBall`: the Lp ball of radius ``eps``, p in
{2, inf}, intersected with the image box [0,1]^d when ``box``) and labels ``y [B]``, the specification
``C [B,K-1,K]`` has the rows ``e_y - e_k``, ``k != y`` (:func:`marginlab.bounds.crown.margin_spec`), and
both methods return lower bounds ``L [B,K-1] <= min_{x in X} f_y(x) - f_k(x)``:

- :func:`interval_bounds`: the interval of every layer's input, layer by layer (``M mid + c +- |M| rad``
  for an affine layer, the layer itself on both ends for ReLU / max-pooling / flatten). The input's
  interval is ``[x0 - eps, x0 + eps]`` clipped to the box; for an L2 ball the first Linear / Conv layer
  also gets the exact ball bound ``M x0 + c +- eps ||M_row||_2``, intersected with the interval;
- :func:`ibp_margin_lower`: the last layer folded into the specification (``C W``, ``C b``) and applied
  to the interval of its input, as the paper does: tighter than subtracting logit intervals;
- :func:`crown_ibp_margin_lower`: the rows ``C W`` pulled back to the input through the layers with the
  interval bounds as intermediate bounds (ReLU: adaptive lower slope, upper chord; max-pooling:
  DeepPoly's relaxation) and minimised over ``X`` in closed form (L-inf or the box: per coordinate;
  L2 in R^d: Hoelder; L2 in the box: the better of the ball's and the box's minimum, both sound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.crown import margin_spec
from marginlab.bounds.layers import conv_padding, pair
from marginlab.bounds.network import chain_leaves

__all__ = [
    "SUPPORTED",
    "TrainingBall",
    "chain_layers",
    "crown_ibp_margin_lower",
    "ibp_margin_lower",
    "interval_bounds",
    "worst_case_logits",
]

SUPPORTED = "Linear, Conv2d, ReLU, Flatten, MaxPool2d (no padding, dilation or ceil_mode), Dropout, Identity"
_SKIP = (nn.Dropout, nn.Identity)  # the identity in bounds (dropout: the bound of the expected network)
_KNOWN = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.MaxPool2d, *_SKIP)
Box = tuple[Tensor, Tensor]


def _walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, leaf)`` in the order they run (:func:`marginlab.bounds.network.chain_leaves`); a one-line
    :class:`ConfigError` for a leaf that is not a known layer (a subclass overriding ``forward`` computes
    something else: refused too)."""
    leaves = chain_leaves(model)
    for path, module in leaves:
        if not any(isinstance(module, k) and type(module).forward is k.forward for k in _KNOWN):
            where = f" at {path}" if path else ""
            raise ConfigError(f"certified training cannot bound layer {type(module).__name__}{where}; "
                              f"supported: {SUPPORTED}")  # fmt: skip
    return leaves


def chain_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` in order, identities (Dropout, Identity) left out; a one-line
    :class:`ConfigError` for any other layer, a max-pooling with padding, dilation or ceil mode, a
    Flatten of the batch axis, a non-zero padding mode, or a last layer that is not ``nn.Linear``."""
    layers: list[nn.Module] = []
    for path, m in _walk(model):
        if isinstance(m, _SKIP):
            continue
        if isinstance(m, nn.MaxPool2d) and (
            pair(m.padding) != (0, 0) or pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices
        ):
            raise ConfigError(f"certified training needs MaxPool2d without padding, dilation or ceil_mode "
                              f"(at {path})")  # fmt: skip
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise ConfigError(f"certified training needs Conv2d with zero padding (at {path})")
        if isinstance(m, nn.Flatten) and m.start_dim == 0:
            raise ConfigError(f"certified training needs Flatten to keep the batch axis (at {path})")
        layers.append(m)
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ConfigError("certified training needs a network ending in an nn.Linear layer (the logits)")
    return layers


@dataclass(frozen=True)
class TrainingBall:
    """``{x : ||x - x0||_p <= eps}`` (``x0 [B,*in]``, ``eps >= 0``, ``p`` 2 or inf), intersected with the
    box [0,1]^d when ``box``."""

    x0: Tensor
    eps: float
    p: float
    box: bool

    def interval(self) -> Box:
        """Per-coordinate bounds ``(lo, hi)`` ``[B,*in]`` (``|x_i - x0_i| <= ||x - x0||_p`` for every p)."""
        lo, hi = self.x0 - self.eps, self.x0 + self.eps
        return (lo.clamp(0.0, 1.0), hi.clamp(0.0, 1.0)) if self.box else (lo, hi)

    def concretize(self, a: Tensor) -> Tensor:
        """A lower bound ``[B,S]`` of ``a [B,S,D] . x`` over the set (exact unless L2 in the box)."""
        lo, hi = (t.flatten(1)[:, :, None] for t in self.interval())
        # min over the box lo <= x <= hi: a . mid - |a| . rad, as batched products (fast)
        box_min = (a @ ((hi + lo) / 2))[..., 0] - (a.abs() @ ((hi - lo) / 2))[..., 0]
        if self.p == math.inf:
            return box_min  # the L-inf ball, in the box or not, is a box
        ball_min = (a * self.x0.flatten(1)[:, None, :]).sum(2) - self.eps * torch.linalg.vector_norm(a, dim=2)
        return torch.maximum(ball_min, box_min) if self.box else ball_min


def _lin(layer: nn.Linear | nn.Conv2d, x: Tensor, weight: Tensor) -> Tensor:
    """The linear part of an affine ``layer`` with ``weight`` in place of its own, without bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _ball_bound(layer: nn.Linear | nn.Conv2d, x: Tensor, eps: float) -> Box:
    """The exact bounds of an affine layer's output over the L2 ball around ``x``: ``M x + c +- eps
    ||M_row||_2`` (a conv's rows near the border see the zero padding: ``sqrt((M*M) 1)`` counts it)."""
    sq = _lin(layer, torch.ones_like(x[:1]), layer.weight.square())
    radius = eps * sq.clamp_min(1e-30).sqrt()  # the clamp keeps the gradient finite at a zero row
    center = layer(x)
    return center - radius, center + radius


def interval_bounds(layers: list[nn.Module], ball: TrainingBall) -> list[Box]:
    """``boxes[i] = (lo, hi)`` ``[B,*shape]``: bounds of the *input* of ``layers[i]`` over ``ball``
    (``len(layers)`` boxes; the last is the interval of the last hidden layer)."""
    lo, hi = ball.interval()
    boxes: list[Box] = []
    first_block = ball.p == 2.0  # before any ReLU / max-pooling: the ball bound is exact there
    x = ball.x0
    for layer in layers:
        boxes.append((lo, hi))
        if isinstance(layer, nn.Linear | nn.Conv2d):
            mid, rad = (hi + lo) / 2, (hi - lo) / 2
            center, radius = layer(mid), _lin(layer, rad, layer.weight.abs())
            lo, hi = center - radius, center + radius
            if first_block:
                b_lo, b_hi = _ball_bound(layer, x, ball.eps)
                lo, hi = torch.maximum(lo, b_lo), torch.minimum(hi, b_hi)
                first_block = False
        else:  # ReLU, max-pooling, flatten: monotone, so the image of a box is its ends' images
            if first_block and isinstance(layer, nn.Flatten):
                x = layer(x)
            else:
                first_block = False
            lo, hi = layer(lo), layer(hi)
    return boxes


def _spec(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``C [B,K-1,K]``: rows ``e_y - e_k`` for every ``k != y``."""
    return margin_spec(y, num_classes, torch.ones(len(y), device=y.device)).to(dtype)


def _others(y: Tensor, num_classes: int) -> Tensor:
    """``[B,K-1]``: the classes ``k != y`` of every sample, in order."""
    keep = ~torch.eye(num_classes, dtype=torch.bool, device=y.device)[y]
    return torch.arange(num_classes, device=y.device).expand(len(y), num_classes)[keep].reshape(len(y), -1)


def ibp_margin_lower(layers: list[nn.Module], boxes: list[Box], ball: TrainingBall, y: Tensor) -> Tensor:
    """IBP's ``L [B,K-1] <= f_y - f_k`` (``k != y`` in order): the last layer ``W, b`` folded into
    the specification, ``(w_y - w_k) . mid + b_y - b_k - |w_y - w_k| . rad`` on the interval of its
    input (for a linear model and an L2 ball, also the exact ``... - eps ||w_y - w_k||_2``)."""
    head = layers[-1]
    assert isinstance(head, nn.Linear)
    lo, hi = boxes[-1]
    k = head.out_features
    others = _others(y, k)
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    z = head(mid)  # [B,K]: the centre of every gap is a difference of these
    center = z.gather(1, y[:, None]) - z.gather(1, others)
    # |w_j - w_k| . rad for every pair (j, k) at once: one [B,F] x [F,K*K] product, then the pairs needed
    pairs = (head.weight[:, None, :] - head.weight[None, :, :]).abs().reshape(k * k, -1)
    radius = (rad @ pairs.T).reshape(-1, k, k)
    lower = center - radius[torch.arange(len(y), device=y.device)[:, None], y[:, None], others]
    if ball.p == 2.0 and all(isinstance(m, nn.Flatten) for m in layers[:-1]):
        z0 = head(ball.x0.flatten(1))
        w = head.weight[y][:, None, :] - head.weight[others]  # [B,K-1,F]
        gap0 = z0.gather(1, y[:, None]) - z0.gather(1, others)
        lower = torch.maximum(lower, gap0 - ball.eps * torch.linalg.vector_norm(w, dim=2))
    return lower


def _relu_back(a: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``a [B,S,*shape]`` through a ReLU with input bounds ``lo, hi [B,*shape]``: lower slope 1
    where ``hi > -lo`` else 0 for positive entries, the chord ``hi (z - lo) / (hi - lo)`` for negative."""
    unstable = (lo < 0) & (hi > 0)
    active = (lo >= 0).to(a.dtype)
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))  # no 0/0 in the unused branch
    chord = torch.where(unstable, hi / width, active)
    low = torch.where(unstable, (hi > -lo).to(a.dtype), active)
    intercept = torch.where(unstable, -chord * lo, torch.zeros_like(lo))
    flat = a.flatten(2)  # [B,S,N]
    d = (flat.clamp(max=0) @ intercept.flatten(1)[:, :, None])[..., 0]
    slope = torch.where(a >= 0, low[:, None], chord[:, None])
    return a * slope, d


def _pool_back(layer: nn.MaxPool2d, a: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``a [B,S,C,h,w]`` through a max-pooling with input bounds ``[B,C,H,W]`` (DeepPoly, as
    :class:`marginlab.bounds.ops.MaxPool`): ``max >= z_star`` (the entry of largest lower bound);
    ``max <= max_j u_j``, or ``= z_star`` when ``z_star`` dominates its window."""
    k = pair(layer.kernel_size)
    s = pair(layer.stride if layer.stride is not None else layer.kernel_size)
    b, n = a.shape[:2]
    c, h, w = lo.shape[1:]
    lw = F.unfold(lo, k, stride=s).reshape(b, c, k[0] * k[1], -1)  # [B,C,kk,L]
    uw = F.unfold(hi, k, stride=s).reshape(b, c, k[0] * k[1], -1)
    low_max, star = lw.detach().max(dim=2)  # [B,C,L]
    others = uw.detach().scatter(2, star[:, :, None], -math.inf).amax(dim=2)
    dominated = (low_max >= others)[:, None]  # [B,1,C,L]
    top = uw.amax(dim=2)[:, None]
    a = a.reshape(b, n, c, -1)
    neg = a.clamp(max=0)
    coef = a.clamp(min=0) + torch.where(dominated, neg, torch.zeros_like(neg))
    d = torch.where(dominated, torch.zeros_like(neg), neg * top).sum((2, 3))
    onehot = F.one_hot(star, k[0] * k[1]).permute(0, 1, 3, 2).to(a.dtype)  # [B,C,kk,L]
    cols = (coef[:, :, :, None, :] * onehot[:, None]).reshape(b * n, c * k[0] * k[1], -1)
    back = F.fold(cols, (h, w), k, stride=s)
    return back.reshape(b, n, c, h, w), d


def _affine_back(layer: nn.Module, a: Tensor, in_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Rows ``a [B,S,*out]`` through an affine layer: ``(a M [B,S,*in], a . c [B,S])``, exact."""
    b, n = a.shape[:2]
    if isinstance(layer, nn.Linear):
        d = a @ layer.bias if layer.bias is not None else a.new_zeros(b, n)
        return a @ layer.weight, d
    assert isinstance(layer, nn.Conv2d)
    d = (a.sum((3, 4)) @ layer.bias) if layer.bias is not None else a.new_zeros(b, n)
    pad = conv_padding(layer.padding, layer.kernel_size, layer.dilation)
    stride, dil, kern = pair(layer.stride), pair(layer.dilation), pair(layer.kernel_size)
    out = a.shape[3:]
    # the output padding recovers input rows / columns that the strided convolution never reached
    extra = [
        in_shape[1 + i] - ((out[i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (kern[i] - 1) + 1) for i in (0, 1)
    ]
    back = F.conv_transpose2d(a.reshape(b * n, *a.shape[2:]), layer.weight, None, stride, pad,
                              tuple(extra), layer.groups, dil)  # fmt: skip
    return back.reshape(b, n, *in_shape), d


def crown_ibp_margin_lower(
    layers: list[nn.Module], boxes: list[Box], ball: TrainingBall, y: Tensor
) -> Tensor:
    """CROWN-IBP's ``L [B,K-1] <= f_y - f_k``: the rows ``C W`` of the folded last layer pulled back to
    the input with the interval bounds ``boxes`` (:func:`interval_bounds`) as intermediate bounds, then
    minimised over ``ball`` (:meth:`TrainingBall.concretize`)."""
    head = layers[-1]
    assert isinstance(head, nn.Linear)
    c = _spec(y, head.out_features, ball.x0.dtype)
    a, d = _affine_back(head, c, boxes[-1][0].shape[1:])
    for i in range(len(layers) - 2, -1, -1):
        layer, (lo, hi) = layers[i], boxes[i]
        if isinstance(layer, nn.ReLU):
            a, extra = _relu_back(a, lo, hi)
        elif isinstance(layer, nn.MaxPool2d):
            a, extra = _pool_back(layer, a, lo, hi)
        elif isinstance(layer, nn.Flatten):
            a, extra = a.reshape(*a.shape[:2], *lo.shape[1:]), torch.zeros_like(d)
        else:
            a, extra = _affine_back(layer, a, lo.shape[1:])
        d = d + extra
    return ball.concretize(a.flatten(2)) + d


def worst_case_logits(lower: Tensor, y: Tensor) -> Tensor:
    """``[B,K]`` logits whose cross-entropy is the certified training loss: ``-L_k`` at ``k != y`` and 0
    at ``y``, for ``lower [B,K-1]`` (the ``k != y`` in order). Each entry is an upper bound of
    ``f_k - f_y`` on the set, so the cross-entropy bounds that of every point of it (cross-entropy is
    invariant to shifting all logits, and increases with ``f_k - f_y``)."""
    return lower.new_zeros(len(y), lower.shape[1] + 1).scatter(1, _others(y, lower.shape[1] + 1), -lower)
