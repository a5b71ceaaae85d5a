"""A PyTorch network as the list of :mod:`marginlab.bounds.ops` operations that bound propagation walks.

The network ``f = op_n ∘ ... ∘ op_1`` is read from its leaf modules in order: a
:class:`~marginlab.nets.models.MarginNet` (``phi`` then ``head``) or an ``nn.Sequential``, nested freely.
Each leaf becomes one operation on the per-sample tensor (shapes without the batch):

- ``nn.Linear`` -> :class:`Dense`; ``nn.Conv2d`` (zero padding) -> :class:`Conv`;
- ``nn.AvgPool2d`` -> a depthwise :class:`Conv` with weights ``1 / (kh kw)`` (averaging is linear);
- ``nn.Flatten()`` -> :class:`Reshape`; ``nn.ReLU`` -> :class:`ReLU`; ``nn.MaxPool2d`` (no padding,
  dilation or ceil mode) -> :class:`MaxPool`;
- a module holding tensors ``mean`` and ``std`` that computes ``(x - mean) / std`` (checked on a random
  sample; :class:`marginlab.nets.preprocess.Normalize` is one) -> :class:`Scale` with ``s = 1 / std``,
  ``c = -mean / std``;
- ``nn.Identity`` and ``nn.Dropout`` (the identity in eval mode) -> nothing.

Anything else is a :class:`ConfigError` naming the layer; the last operation must be affine (logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.graph import Graph
from marginlab.bounds.ops import Affine, Conv, Dense, MaxPool, Op, ReLU, Reshape, Scale, Shape
from marginlab.nets.models import MarginNet

_SKIP = (nn.Identity, nn.Dropout)
SUPPORTED = "Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, Identity, Dropout, a (x-mean)/std module"


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The leaf modules of a MarginNet or (nested) ``nn.Sequential``, in the order they run."""
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
    buffer = module.mean
    assert isinstance(buffer, Tensor)  # checked by _op
    with torch.no_grad():
        got = module(probe.to(buffer.device)).double().cpu()
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
        return Conv(
            module.weight,
            module.bias,
            shape,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
        )
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


def network_graph(model: nn.Module, in_shape: Sequence[int]) -> Graph:
    """The :class:`~marginlab.bounds.graph.Graph` of ``model`` on inputs ``[N, *in_shape]``.

    Today: a MarginNet or (nested) ``nn.Sequential`` as the chain of :func:`network_ops`.
    """
    return Graph.from_ops(network_ops(model, in_shape), in_shape)
