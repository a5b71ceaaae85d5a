"""One PyTorch layer (a leaf module) as a :mod:`marginlab.bounds.ops` operation on the per-sample tensor.

Shared by the two readers of a network (:mod:`marginlab.bounds.network` for ``nn.Sequential`` /
``MarginNet``, :mod:`marginlab.bounds.trace` for any traceable ``forward``). Shapes exclude the batch.

- ``nn.Linear`` -> :class:`Dense`; ``nn.Conv2d`` (zero padding; ``"same"`` if symmetric) -> :class:`Conv`;
- ``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d`` when the input divides evenly (then it is an average pooling)
  -> a depthwise :class:`Conv` with weights ``1 / (kh kw)`` (averaging is linear);
- ``nn.Flatten`` / ``nn.Unflatten`` (not of the batch axis) -> :class:`Reshape`; ``nn.ReLU`` ->
  :class:`ReLU`; ``nn.MaxPool2d`` (no padding, dilation or ceil mode) -> :class:`MaxPool`;
- ``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics -> :class:`Scale` with, per channel,
  ``s = weight / sqrt(running_var + eps)``, ``c = bias - running_mean * s``;
- a module holding tensors ``mean`` and ``std`` that computes ``(x - mean) / std`` (checked on a random
  sample; :class:`marginlab.nets.preprocess.Normalize` is one) -> :class:`Scale` with ``s = 1 / std``,
  ``c = -mean / std``;
- ``nn.Identity`` and the dropout layers in eval mode -> nothing (the identity).

Layers that depend on the batch (batch norm in training mode or without running statistics, dropout in
training mode) are refused: bound propagation bounds one sample at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.ops import Conv, Dense, MaxPool, Op, ReLU, Reshape, Scale, Shape

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_KNOWN = (
    nn.Identity,
    *_DROPOUT,
    *_BATCHNORM,
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)
SUPPORTED = (
    "Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (exact), BatchNorm (eval), "
    "Identity, Dropout (eval), a (x-mean)/std module"
)


def is_normalize(module: nn.Module) -> bool:
    """Whether ``module`` holds tensors ``mean`` and ``std`` (and no sub-modules): a ``(x - mean) / std``."""
    has = all(isinstance(getattr(module, k, None), Tensor) for k in ("mean", "std"))
    return has and not any(True for _ in module.children())


def is_known(module: nn.Module) -> bool:
    """Whether :func:`module_op` converts ``module`` (it may still refuse some settings of it)."""
    # a subclass that overrides forward computes something else: it is traced into instead
    known = any(isinstance(module, k) and type(module).forward is k.forward for k in _KNOWN)
    return known or is_normalize(module)


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """``3 -> (3, 3)``, ``(2, 3) -> (2, 3)``: a 2-D kernel, stride or padding."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def avg_pool(shape: Shape, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int]) -> Conv:
    """Average pooling of ``(C, H, W)`` (zeros padded, counted) as a depthwise convolution."""
    c = shape[0]
    weight = torch.full((c, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=torch.float64)
    return Conv(weight, None, shape, stride=stride, padding=pad, groups=c)


def reshape_op(module: nn.Module, shape: Shape) -> Reshape:
    """``nn.Flatten`` / ``nn.Unflatten`` on ``[N, *shape]``, refused when it would touch the batch axis."""
    dims = (
        [module.start_dim, module.end_dim] if isinstance(module, nn.Flatten) else [getattr(module, "dim", 0)]
    )
    if any(int(d) % (len(shape) + 1) == 0 for d in dims):  # dims count the batch axis
        raise ConfigError(f"bound propagation needs {type(module).__name__} to keep the batch axis (dim 0)")
    with torch.no_grad():
        out = module(torch.zeros(1, *shape))
    return Reshape(shape, tuple(out.shape[1:]))


def normalize_op(module: nn.Module, shape: Shape) -> Scale:
    """A module with ``mean`` and ``std`` tensors computing ``(x - mean) / std`` (checked on a sample)."""
    mean, std = (torch.as_tensor(getattr(module, k)).detach().cpu().double() for k in ("mean", "std"))
    if len(shape) == 3 and mean.numel() in (1, shape[0]):  # per channel (one value: every channel)
        mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
    op = Scale(1.0 / std, -mean / std, shape)
    probe = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    buffer = module.mean
    assert isinstance(buffer, Tensor)  # checked by is_normalize
    with torch.no_grad():
        got = module(probe.to(buffer.device, buffer.dtype)).double().cpu()
    if not torch.allclose(got, op.forward(probe.double()), rtol=1e-4, atol=1e-5):
        raise ConfigError(f"{type(module).__name__} has mean/std but does not compute (x - mean) / std")
    return op


def batchnorm_scale(
    shape: Shape, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Scale:
    """Eval-mode batch norm on ``[N, C, *rest]`` (per-sample ``shape = (C, *rest)``) as a per-channel
    :class:`Scale`: ``s = weight / sqrt(var + eps)``, ``c = bias - mean * s``; each statistic ``[C]``."""
    mean, var = mean.detach().cpu().double(), var.detach().cpu().double()
    s = 1.0 / torch.sqrt(var + eps)
    if weight is not None:
        s = s * weight.detach().cpu().double()
    c = -mean * s + (bias.detach().cpu().double() if bias is not None else 0.0)
    channel = (len(s), *[1] * (len(shape) - 1))  # broadcast over the positions of each channel
    return Scale(s.reshape(channel), c.reshape(channel), shape)


def _batchnorm_op(module: nn.Module, shape: Shape) -> Scale:
    assert isinstance(module, _BATCHNORM)
    name = type(module).__name__
    if module.training:
        raise ConfigError(f"{name} is in training mode (batch statistics): call model.eval() first")
    if module.running_mean is None or module.running_var is None:
        raise ConfigError(f"{name} has no running statistics (track_running_stats=False): it normalises by "
                          "the batch, which bound propagation cannot bound one sample at a time")  # fmt: skip
    return batchnorm_scale(
        shape, module.running_mean, module.running_var, module.weight, module.bias, module.eps
    )


def _adaptive_avg_op(module: nn.AdaptiveAvgPool2d, shape: Shape) -> Conv:
    size = module.output_size
    want = (size, size) if isinstance(size, int) or size is None else tuple(size)
    if len(shape) != 3:
        raise ConfigError(f"bound propagation supports AdaptiveAvgPool2d on [N, C, H, W] only, got {shape}")
    out = [shape[1 + i] if o is None else int(o) for i, o in enumerate(want)]
    if shape[1] % out[0] or shape[2] % out[1]:
        raise ConfigError(f"AdaptiveAvgPool2d to {tuple(out)} on {shape[1]}x{shape[2]} inputs is not an "
                          "average pooling (the size does not divide); use nn.AvgPool2d")  # fmt: skip
    kernel = (shape[1] // out[0], shape[2] // out[1])
    return avg_pool(shape, kernel, kernel, (0, 0))


def conv_padding(
    padding: str | int | Sequence[int], kernel: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int]:
    """Numeric zero padding of a 2-D convolution (``"valid"``: 0; ``"same"`` when both sides get alike)."""
    if padding == "valid":
        return 0, 0
    if isinstance(padding, str):  # "same": total d (k - 1) per dimension, split evenly or refused
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        if any(t % 2 for t in total):
            raise ConfigError("bound propagation supports Conv2d padding='same' only with odd kernels")
        return total[0] // 2, total[1] // 2
    return pair(padding)


def _pool_op(module: nn.Module, shape: Shape) -> Op:
    if isinstance(module, nn.MaxPool2d):
        if pair(module.padding) != (0, 0) or pair(module.dilation) != (1, 1) or module.ceil_mode:
            raise ConfigError("bound propagation supports MaxPool2d without padding, dilation or ceil_mode")
        if module.return_indices:
            raise ConfigError("bound propagation supports MaxPool2d without return_indices")
        stride = pair(module.stride if module.stride is not None else module.kernel_size)
        return MaxPool(shape, pair(module.kernel_size), stride)
    if isinstance(module, nn.AvgPool2d):
        k, pad = pair(module.kernel_size), pair(module.padding)
        if module.ceil_mode or module.divisor_override or (pad != (0, 0) and not module.count_include_pad):
            raise ConfigError("bound propagation supports AvgPool2d without ceil_mode or divisor_override")
        stride = pair(module.stride if module.stride is not None else module.kernel_size)
        return avg_pool(shape, k, stride, pad)
    assert isinstance(module, nn.AdaptiveAvgPool2d)
    return _adaptive_avg_op(module, shape)


def module_op(module: nn.Module, shape: Shape) -> Op | None:
    """The operation of one leaf module on inputs of per-sample ``shape`` (``None``: the identity).

    A :class:`ConfigError` (one line) for a module it does not know (see :func:`is_known`) or a setting
    of it that bound propagation does not support.
    """
    if isinstance(module, _DROPOUT):
        if module.training and module.p > 0:
            raise ConfigError(
                f"{type(module).__name__} is in training mode (random): call model.eval() first"
            )
        return None
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.Linear):
        return Dense(module.weight, module.bias)
    if isinstance(module, nn.Flatten | nn.Unflatten):
        return reshape_op(module, shape)
    if isinstance(module, nn.ReLU):
        return ReLU(shape)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ConfigError("bound propagation supports Conv2d with zero padding only")
        pad = conv_padding(module.padding, module.kernel_size, module.dilation)
        return Conv(module.weight, module.bias, shape, stride=module.stride, padding=pad,
                    dilation=module.dilation, groups=module.groups)  # fmt: skip
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d | nn.AdaptiveAvgPool2d):
        return _pool_op(module, shape)
    if isinstance(module, _BATCHNORM):
        return _batchnorm_op(module, shape)
    if is_normalize(module):
        return normalize_op(module, shape)
    raise ConfigError(
        f"bound propagation cannot handle layer {type(module).__name__}; supported: {SUPPORTED}"
    )
