"""The calls a traced ``forward`` may make, each as operations of :mod:`marginlab.bounds.ops` (the table of
:mod:`marginlab.bounds.trace`; see there for the list). Shapes exclude the batch axis.

A call's arguments arrive with every traced tensor as a :class:`Traced` (the graph node that computes it
and its per-sample shape) and everything else (numbers, shapes, buffers, parameters) as its value on the
probe. A converter returns the :class:`Traced` of the call's result, appending nodes through ``emit``;
``None`` means the call is not supported (the caller names it and where it is).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.graph import Add
from marginlab.bounds.layers import avg_pool, batchnorm_scale, conv_padding, is_known, module_op, pair
from marginlab.bounds.ops import Conv, Dense, Op, ReLU, Reshape, Scale, Shape


@dataclass(frozen=True)
class Traced:
    """A tensor computed from the network's input: node ``index`` of the graph (``INPUT``: the input
    itself) and its per-sample ``shape``."""

    index: int
    shape: Shape


SUPPORTED_CALLS = (
    "Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (exact), BatchNorm (eval), "
    "Dropout (eval), Identity, their functional forms, flatten/view/reshape keeping the batch axis, "
    "x + y, x - y, + - * / by constants, x.mean((2, 3)), a final softmax"
)
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
Emit = Callable[[Op | Add, tuple[Traced, ...]], Traced]
Args = Sequence[Any]
Kwargs = Mapping[str, Any]

_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.divide: "div",
    torch.true_divide: "div", operator.neg: "neg", torch.neg: "neg", torch.negative: "neg",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.mm: "matmul",
    torch.flatten: "reshape", torch.reshape: "reshape", torch.squeeze: "reshape", torch.unsqueeze: "reshape",
    torch.clone: "identity", F.dropout: "dropout", F.dropout1d: "dropout", F.dropout2d: "dropout",
    F.dropout3d: "dropout", torch.dropout: "dropout",
    F.max_pool2d: "max_pool2d", torch.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d", torch.mean: "mean",
    F.linear: "linear", F.conv2d: "conv2d", F.batch_norm: "batch_norm",
    F.softmax: "softmax", torch.softmax: "softmax",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
}  # fmt: skip
_METHODS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
    "mul": "mul", "mul_": "mul", "div": "div", "div_": "div", "true_divide": "div", "neg": "neg",
    "neg_": "neg", "matmul": "matmul", "view": "reshape", "reshape": "reshape", "flatten": "reshape",
    "squeeze": "reshape", "unsqueeze": "reshape", "contiguous": "identity", "clone": "identity",
    "mean": "mean", "softmax": "softmax", "log_softmax": "log_softmax",
}  # fmt: skip


def call_key(n: fx.Node) -> str | None:
    """What a recorded call is (``"relu"``, ``"add"``, ``"module"``...), or ``None`` when unknown."""
    if n.op == "call_module":
        return "module"
    if n.op == "call_method":
        return _METHODS.get(str(n.target))
    try:
        return _FUNCTIONS.get(n.target) if n.op == "call_function" else None
    except TypeError:  # an unhashable target
        return None


def is_shape_query(n: fx.Node) -> bool:
    """Whether ``n`` asks a tensor for its shape (``x.size(0)``, ``x.shape``, ``x.dim()``): a constant."""
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    return n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS


def convert_call(
    key: str | None, module: nn.Module | None, args: Args, kwargs: Kwargs, out: Shape, emit: Emit
) -> Traced | None:
    """The result of one call (its per-sample output shape on the probe: ``out``); ``None``: unsupported."""
    if key in ("add", "sub", "mul", "div", "neg", "matmul"):
        return _arithmetic(key, args, kwargs, emit)
    convert = _UNARY.get(key or "")
    x = args[0] if args else None
    others = [*args[1:], *kwargs.values()]
    if convert is None or not isinstance(x, Traced) or any(isinstance(a, Traced) for a in _flat(others)):
        return None
    return convert(module, x, _bind(args, kwargs, _NAMES.get(key or "", ())), out, emit)


def _flat(values: Sequence[Any]) -> list[Any]:
    """Arguments with lists and tuples opened (``torch.cat([x, y])``)."""
    out: list[Any] = []
    for v in values:
        out += _flat(v) if isinstance(v, list | tuple) else [v]
    return out


def _bind(args: Args, kwargs: Kwargs, names: tuple[str, ...]) -> dict[str, Any]:
    """Positional arguments after the input named as in the function's signature, plus the keywords."""
    return dict(zip(names, args[1:], strict=False)) | dict(kwargs)


def _constant(c: Any, shape: Shape) -> Tensor:
    """A number or tensor as a per-sample tensor of ``shape``; it may broadcast within one sample only."""
    try:
        t = c.detach().cpu().double() if isinstance(c, Tensor) else torch.tensor(c, dtype=torch.float64)
        if t.dim() > len(shape) + 1 or (t.dim() == len(shape) + 1 and t.shape[0] != 1):
            raise RuntimeError("it spans the batch axis")
        return torch.broadcast_to(t, (1, *shape))[0].clone()
    except (RuntimeError, TypeError, ValueError) as e:
        what = list(c.shape) if isinstance(c, Tensor) else type(c).__name__
        raise ConfigError(
            f"a constant ({what}) does not broadcast within one sample {list(shape)}: {e}"
        ) from None


def _scale(x: Traced, s: Any, c: Any) -> Scale:
    return Scale(_constant(s, x.shape), _constant(c, x.shape), x.shape)


def _arithmetic(key: str, args: Args, kwargs: Kwargs, emit: Emit) -> Traced | None:
    """``x + y``, ``x - y`` (two traced tensors: Add), and traced tensors with constants (Scale, Dense)."""
    a = args[0]
    if key == "neg":
        return emit(_scale(a, -1.0, 0.0), (a,)) if isinstance(a, Traced) else None
    b = args[1] if len(args) > 1 else kwargs.get("other")
    if key in ("add", "sub"):
        sign = kwargs.get("alpha", 1) * (1 if key == "add" else -1)
        if isinstance(a, Traced) and isinstance(b, Traced):
            if a.shape != b.shape:
                raise ConfigError(
                    f"bound propagation adds tensors of one shape only, got {a.shape} and {b.shape}"
                )
            b = b if sign == 1 else emit(_scale(b, sign, 0.0), (b,))
            return emit(Add(a.shape), (a, b))
        if isinstance(a, Traced):
            return emit(_scale(a, 1.0, sign * _constant(b, a.shape)), (a,))
        return emit(_scale(b, sign, a), (b,)) if isinstance(b, Traced) else None
    if key == "mul" and isinstance(a, Traced) and not isinstance(b, Traced):
        return emit(_scale(a, b, 0.0), (a,))
    if key == "mul" and isinstance(b, Traced) and not isinstance(a, Traced):
        return emit(_scale(b, a, 0.0), (b,))
    if key == "div" and isinstance(a, Traced) and not isinstance(b, Traced):
        if kwargs.get("rounding_mode") is not None:
            return None
        return emit(_scale(a, 1.0 / _constant(b, a.shape), 0.0), (a,))
    if (
        key == "matmul"
        and isinstance(a, Traced)
        and isinstance(b, Tensor)
        and b.dim() == 2
        and len(a.shape) == 1
    ):
        return emit(Dense(b.T, None), (a,))
    return None


def _module(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced | None:
    if module is None or not is_known(module):
        return None
    op = module_op(module, x.shape)
    return x if op is None else emit(op, (x,))


def _relu(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced:
    return emit(ReLU(x.shape), (x,))


def _identity(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced:
    return x


def _reshape(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced:
    return x if out == x.shape else emit(Reshape(x.shape, out), (x,))


def _dropout(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced:
    if p.get("training", p.get("train", True)) and p.get("p", 0.5) > 0:
        raise ConfigError(
            "dropout with training=True is random: pass training=self.training and call model.eval()"
        )
    return x


def _max_pool(
    module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit
) -> Traced | None:
    p["stride"] = p.get("stride") or None  # torch.max_pool2d spells "the kernel" as []
    return _module(nn.MaxPool2d(**p), x, p, out, emit)


def _avg_pool(
    module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit
) -> Traced | None:
    p["stride"] = p.get("stride") or None
    return _module(nn.AvgPool2d(**p), x, p, out, emit)


def _adaptive(
    module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit
) -> Traced | None:
    return _module(nn.AdaptiveAvgPool2d(p["output_size"]), x, p, out, emit)


def _mean(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced | None:
    """``x.mean((2, 3))`` of ``[N, C, H, W]``: global average pooling (then a Reshape unless keepdim)."""
    dims = p.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if len(x.shape) != 3 or sorted(d % 4 for d in dims) != [2, 3]:
        return None
    c, h, w = x.shape
    pooled = emit(avg_pool(x.shape, (h, w), (h, w), (0, 0)), (x,))
    return pooled if p.get("keepdim") else emit(Reshape(pooled.shape, (c,)), (pooled,))


def _linear(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced:
    return emit(Dense(p["weight"], p.get("bias")), (x,))


def _conv(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced:
    weight, dilation = p["weight"], pair(p.get("dilation", 1))
    pad = conv_padding(p.get("padding", 0), weight.shape[2:], dilation)
    op = Conv(weight, p.get("bias"), x.shape, stride=pair(p.get("stride", 1)), padding=pad,
              dilation=dilation, groups=p.get("groups", 1))  # fmt: skip
    return emit(op, (x,))


def _batch_norm(module: nn.Module | None, x: Traced, p: dict[str, Any], out: Shape, emit: Emit) -> Traced:
    if p.get("training", False) or p.get("running_mean") is None or p.get("running_var") is None:
        raise ConfigError("batch_norm with the batch's statistics (training=True or no running statistics) "
                          "depends on the batch: call model.eval() and keep running statistics")  # fmt: skip
    scale = batchnorm_scale(x.shape, p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"),
                            p.get("eps", 1e-5))  # fmt: skip
    return emit(scale, (x,))


_Convert = Callable[[nn.Module | None, Traced, dict[str, Any], Shape, Emit], Traced | None]
_UNARY: dict[str, _Convert] = {
    "module": _module, "relu": _relu, "identity": _identity, "reshape": _reshape, "dropout": _dropout,
    "max_pool2d": _max_pool, "avg_pool2d": _avg_pool, "adaptive_avg_pool2d": _adaptive, "mean": _mean,
    "linear": _linear, "conv2d": _conv, "batch_norm": _batch_norm,
}  # fmt: skip
_NAMES: dict[str, tuple[str, ...]] = {  # the arguments after the input, as the functions name them
    "dropout": ("p", "training"),
    "max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "adaptive_avg_pool2d": ("output_size",),
    "mean": ("dim", "keepdim"),
    "linear": ("weight", "bias"),
    "conv2d": ("weight", "bias", "stride", "padding", "dilation", "groups"),
    "batch_norm": ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
}
