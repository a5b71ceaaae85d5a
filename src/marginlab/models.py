"""Model architectures: a feature map Φ followed by one linear layer.

Every model is a :class:`MarginNet`: ``forward(x) = head(phi(x))`` with ``phi: [N,C,H,W] -> [N,F]``
and ``head: nn.Linear(F, K)``. The regularizers need Φ and the last layer; the Lipschitz bound needs
the layer list. Architectures follow the authors' released code (watml/rob-margin, ``Model.py``):
3x3 convolutions with padding 0, 2x2 max-pooling after every second convolution, ReLU. One
difference: the released MLPs use softplus, DESIGN.md §2 says ReLU; ReLU is the default here and
``activation="softplus"`` gives the released variant.
"""

import inspect
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from marginlab.errors import ConfigError
from marginlab.registry import Registry

Shape = tuple[int, int, int]
MNIST_SHAPE: Shape = (1, 28, 28)
CIFAR_SHAPE: Shape = (3, 32, 32)
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "softplus": nn.Softplus}


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
    return shape  # type: ignore[return-value]


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
) -> MarginNet:
    """Fully connected net: flatten, then ``Linear(width) + activation`` per width, then the head."""
    shape = _check_shape(input_shape, num_classes)
    if not widths or min(widths) < 1:
        raise ConfigError(f"mlp widths must be a non-empty list of positive ints, got {list(widths)}")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = _dim(shape)
    for w in widths:
        layers += [nn.Linear(fan_in, int(w)), _activation(activation)]
        fan_in = int(w)
    return MarginNet(nn.Sequential(*layers), nn.Linear(fan_in, num_classes), shape, num_classes)


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
) -> MarginNet:
    """Conv net: 3x3 convs + ReLU, a 2x2 max-pool after every ``pool_every`` convs, then ReLU fc
    layers (each followed by dropout when ``dropout > 0``), then the head."""
    shape = _check_shape(input_shape, num_classes)
    if not channels or min(channels) < 1 or not fc or min(fc) < 1 or pool_every < 1:
        raise ConfigError("cnn channels and fc must be non-empty lists of positive ints; pool_every >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
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
    return MarginNet(nn.Sequential(*layers), nn.Linear(fan_in, num_classes), shape, num_classes)


def _preset(base: Callable[..., MarginNet], **defaults: object) -> Callable[..., MarginNet]:
    fn = partial(base, **defaults)
    fn.__doc__ = f"{base.__name__} with {defaults}"
    return fn  # type: ignore[return-value]


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
    unknown ones raise :class:`ConfigError`.
    """
    factory = MODELS.get(name)
    allowed = set(inspect.signature(factory).parameters) - {"input_shape", "num_classes"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option {unknown[0]!r}; options: {', '.join(sorted(allowed)) or 'none'}"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if input_shape is not None:
        kwargs["input_shape"] = input_shape
    return factory(**kwargs)


def linear_layers(model: nn.Module) -> Iterator[torch.Tensor]:
    """Yield the weight of every ``nn.Linear`` and ``nn.Conv2d`` in ``model``, head included, in
    module order: Linear ``[out, in]``, Conv2d ``[out, in, kh, kw]``."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            yield m.weight


def _state_dict_from(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict, or a checkpoint dict holding one under a usual key."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in obj:
                return _state_dict_from(obj[key], path)
    raise ConfigError(f"weights file {path} does not hold a PyTorch state_dict (a dict of tensors)")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a plain PyTorch ``state_dict`` from ``path`` into ``model`` (in place; returns it).

    Checkpoint dicts holding the state_dict under ``model_state_dict``/``state_dict``/``model``
    are accepted too. Raises :class:`ConfigError` naming the first offending key when the file does
    not match the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files (pickle, zip, EOF, runtime)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot read weights file {path}: {msg}") from None
    state = _state_dict_from(obj, path)
    own = model.state_dict()
    arch = type(model).__name__
    for key in own:
        if key not in state:
            raise ConfigError(f"weights file {path} does not fit this {arch}: missing key {key!r}")
    for key, value in state.items():
        if key not in own:
            raise ConfigError(f"weights file {path} does not fit this {arch}: unexpected key {key!r}")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ConfigError(
                f"weights file {path} does not fit this {arch}: {key!r} has shape "
                f"{tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)
    return model
