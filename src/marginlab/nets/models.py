"""Model architectures: a feature map Φ followed by one linear layer.

Every model is a :class:`MarginNet`: ``forward(x) = head(phi(x))`` with ``phi: [N,C,H,W] -> [N,F]``
and ``head: nn.Linear(F, K)``. The regularizers need Φ and the last layer; the Lipschitz bound needs
the layer list. Architectures follow the authors' released code (watml/rob-margin, ``Model.py``):
3x3 convolutions with padding 0, 2x2 max-pooling after every second convolution, ReLU. One
difference: the released MLPs use softplus, docs/reference-settings.md says ReLU; ReLU is the default here and
``activation="softplus"`` gives the released variant.
"""

import inspect
import types
import typing
from collections import abc
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Literal

import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.base.registry import Registry
from marginlab.nets.weights import LoadedWeights, load_weights

__all__ = [
    "MODELS",
    "LoadedWeights",
    "MarginNet",
    "build_model",
    "check_options",
    "linear_layers",
    "load_weights",
]

Shape = tuple[int, int, int]
MNIST_SHAPE: Shape = (1, 28, 28)
CIFAR_SHAPE: Shape = (3, 32, 32)
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "softplus": nn.Softplus}
Init = Literal["default", "kaiming"]
INITS: tuple[str, ...] = typing.get_args(Init)


class MarginNet(nn.Module):
    """``head(phi(x))``: ``x [N,C,H,W]`` -> features ``[N,F]`` -> logits ``[N,K]``."""

    def __init__(self, phi: nn.Module, head: nn.Linear, input_shape: Shape, num_classes: int) -> None:
        super().__init__()
        self.phi = phi
        self.head = head
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Φ(x): ``[N,C,H,W] -> [N,F]``."""
        return self.phi(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N,K]`` of ``x [N,C,H,W]``."""
        return self.head(self.phi(x))


MODELS: Registry[Callable[..., MarginNet]] = Registry("model")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose from: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _check_shape(input_shape: Sequence[int], num_classes: int) -> Shape:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    return shape[0], shape[1], shape[2]


def _init(net: MarginNet, init: str) -> MarginNet:
    """Re-initialise ``net``'s weights: ``"default"`` keeps PyTorch's, ``"kaiming"`` draws every conv and
    linear weight (head included) from N(0, 2 / fan_in) with zero biases (He et al., 2015).

    Why: PyTorch's default (uniform, variance 1 / (3 fan_in)) shrinks the signal by about sqrt(6) per ReLU
    layer, so the 7-layer MNIST CNN starts with logits of std ~0.05 and gradients of 1e-3..4e-2, and
    SGD at lr 0.01 sits at chance for ~200 steps before it escapes; He init keeps activations at scale 1.
    """
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose from: {', '.join(INITS)}")
    if init == "kaiming":
        for m in net.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:  # every layer built here has one
                    nn.init.zeros_(m.bias)
    return net


def _dim(shape: Shape) -> int:
    return shape[0] * shape[1] * shape[2]


@MODELS.register("lr")
def lr(*, input_shape: Sequence[int] = MNIST_SHAPE, num_classes: int = 10) -> MarginNet:
    """Multiclass linear model: Φ = flatten, head = Linear(C·H·W, K)."""
    shape = _check_shape(input_shape, num_classes)
    return MarginNet(nn.Flatten(), nn.Linear(_dim(shape), num_classes), shape, num_classes)


@MODELS.register("mlp")
def mlp(
    *,
    input_shape: Sequence[int] = MNIST_SHAPE,
    num_classes: int = 10,
    widths: Sequence[int] = (1024,),
    activation: str = "relu",
    init: Init = "default",
) -> MarginNet:
    """Fully connected net: flatten, then ``Linear(width) + activation`` per width, then the head.
    ``init``: ``"default"`` (PyTorch's) or ``"kaiming"`` (see :func:`_init`)."""
    shape = _check_shape(input_shape, num_classes)
    if not widths or min(widths) < 1:
        raise ConfigError(f"mlp widths must be a non-empty list of positive ints, got {list(widths)}")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = _dim(shape)
    for w in widths:
        layers += [nn.Linear(fan_in, int(w)), _activation(activation)]
        fan_in = int(w)
    return _init(MarginNet(nn.Sequential(*layers), nn.Linear(fan_in, num_classes), shape, num_classes), init)


@MODELS.register("cnn")
def cnn(
    *,
    input_shape: Sequence[int] = MNIST_SHAPE,
    num_classes: int = 10,
    channels: Sequence[int] = (32, 32, 64, 64),
    fc: Sequence[int] = (200, 200),
    pool_every: int = 2,
    kernel_size: int = 3,
    padding: int = 0,
    dropout: float = 0.0,
    init: Init = "default",
) -> MarginNet:
    """Conv net: 3x3 convs + ReLU, a 2x2 max-pool after every ``pool_every`` convs, then ReLU fc
    layers (each followed by dropout when ``dropout > 0``), then the head. ``init``: ``"default"``
    (PyTorch's) or ``"kaiming"`` (see :func:`_init`)."""
    shape = _check_shape(input_shape, num_classes)
    if not channels or min(channels) < 1 or not fc or min(fc) < 1 or pool_every < 1:
        raise ConfigError("cnn channels and fc must be non-empty lists of positive ints; pool_every >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    if kernel_size < 1 or padding < 0:
        raise ConfigError(f"cnn needs kernel_size >= 1 and padding >= 0, got {kernel_size} and {padding}")
    layers: list[nn.Module] = []
    c_in = shape[0]
    for i, c in enumerate(channels, start=1):
        layers += [nn.Conv2d(c_in, int(c), kernel_size, padding=padding), nn.ReLU()]
        if i % pool_every == 0:
            layers.append(nn.MaxPool2d(2))
        c_in = int(c)
    conv = nn.Sequential(*layers)
    with torch.no_grad():
        try:
            flat = conv(torch.zeros(1, *shape)).numel()
        except RuntimeError:
            raise ConfigError(f"input {shape} is too small for a cnn with {len(channels)} convs") from None
    layers.append(nn.Flatten())
    fan_in = flat
    for w in fc:
        layers += [nn.Linear(fan_in, int(w)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        fan_in = int(w)
    return _init(MarginNet(nn.Sequential(*layers), nn.Linear(fan_in, num_classes), shape, num_classes), init)


def _preset(base: Callable[..., MarginNet], **defaults: object) -> Callable[..., MarginNet]:
    fn = partial(base, **defaults)
    fn.__doc__ = f"{base.__name__} with {defaults}"
    return fn


MODELS.add("mnist-lr", _preset(lr, input_shape=MNIST_SHAPE))
MODELS.add("mnist-mlp", _preset(mlp, input_shape=MNIST_SHAPE, widths=(1024,)))
MODELS.add("mnist-cnn", _preset(cnn, input_shape=MNIST_SHAPE, channels=(32, 32, 64, 64), fc=(200, 200)))
MODELS.add("cifar-lr", _preset(lr, input_shape=CIFAR_SHAPE))
MODELS.add("cifar-mlp", _preset(mlp, input_shape=CIFAR_SHAPE, widths=(1024,)))
MODELS.add(
    "cifar-cnn",
    _preset(cnn, input_shape=CIFAR_SHAPE, channels=(64, 64, 128, 128), fc=(256, 256), dropout=0.5),
)


def build_model(
    name: str, *, num_classes: int | None = None, input_shape: Sequence[int] | None = None, **kwargs: object
) -> MarginNet:
    """Build architecture ``name`` from :data:`MODELS`; ``None`` keeps the architecture's default.

    Extra keyword arguments set architecture options (``widths``, ``channels``, ``dropout``...);
    unknown or wrongly typed ones raise :class:`ConfigError`.
    """
    factory = MODELS.get(name)
    check_options(factory, kwargs, f"model {name!r}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if input_shape is not None:
        kwargs["input_shape"] = input_shape
    return factory(**kwargs)


RESERVED = ("input_shape", "num_classes")  # set from the data, never by an option


def check_options(factory: Callable[..., object], options: dict[str, object], what: str) -> None:
    """Check ``options`` against ``factory``'s signature and type annotations (one-line ConfigError).

    Unknown names (unless the factory takes ``**kwargs``), the reserved :data:`RESERVED` names and values
    whose type does not fit the annotation (``widths="abc"`` for ``Sequence[int]``) are errors; a
    parameter without annotation or with an annotation we cannot check accepts anything.
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    allowed = [n for n, q in params.items() if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
    allowed = [n for n in allowed if n not in RESERVED]
    takes_any = any(q.kind is q.VAR_KEYWORD for q in params.values())
    for key, value in options.items():
        if key in RESERVED or (key not in allowed and not takes_any):
            raise ConfigError(
                f"{what} has no option {key!r} (input shape and classes come from the data); "
                f"options: {', '.join(sorted(allowed)) or 'none'}"
            )
        hint = _hints(factory).get(key, inspect.Parameter.empty)
        if not _fits(value, hint):
            raise ConfigError(f"{what} option {key!r} must be {_describe(hint)}, got {value!r}")
    for name in allowed:
        q = params[name]
        if q.default is q.empty and name not in options:
            raise ConfigError(f"{what} needs option {name!r}: add --option {name}=VALUE (model.options)")


def _hints(factory: Callable[..., object]) -> dict[str, object]:
    """Resolved annotations of a function, a ``functools.partial`` of one, or a class's ``__init__``."""
    target: object = factory.func if isinstance(factory, partial) else factory
    if isinstance(target, type):
        target = inspect.getattr_static(target, "__init__")  # what `target.__init__` finds, unbound
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references in user code: check nothing rather than fail
        return {}


def _fits(value: object, hint: object) -> bool:
    """Whether a TOML-parsed ``value`` fits the annotation ``hint`` (unknown annotations accept all)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (inspect.Parameter.empty, typing.Any, object):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # TOML gives ints for whole numbers; a bool is never a number here
        return isinstance(value, int if hint is int else int | float) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence, abc.Sequence, abc.Iterable, abc.Collection):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return all(_fits(v, args[0]) for v in value) if args else True
    if origin in (dict, abc.Mapping):
        return isinstance(value, dict) and (not args or all(_fits(v, args[1]) for v in value.values()))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: object) -> str:
    """``Sequence[int]`` -> ``"a list of int"`` (for error messages)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, Sequence, abc.Sequence, abc.Iterable, abc.Collection):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def linear_layers(model: nn.Module) -> Iterator[torch.Tensor]:
    """Yield the weight of every ``nn.Linear`` and ``nn.Conv2d`` in ``model``, head included, in
    module order: Linear ``[out, in]``, Conv2d ``[out, in, kh, kw]``."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            yield m.weight
