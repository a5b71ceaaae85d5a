"""``lipschitz``: a certified lower bound from global Lipschitz constants.

For ``f = head ∘ Φ`` with ``Φ`` a chain of layers, ``f_y - f_k`` is Lipschitz (in L2) with constant
``L_k = ||w_y - w_k||_2 * prod_l Lip(layer_l)``, so no point closer than ``(f_y - f_k)(x) / L_k``
can flip ``y`` against ``k``: ``min_k`` of that is a lower bound of the margin of a correctly
classified point (and its magnitude a lower bound of the distance for a misclassified one).

Layer constants, each an upper bound, never an estimate:
- ``nn.Linear``: the exact spectral norm (SVD).
- ``nn.Conv2d``: the spectral norm of the *circular* convolution on the padded input grid, exact by
  FFT (Sedghi et al. 2019); the zero-padded / strided convolution is a row selection of it applied
  to an isometrically padded input, so its norm is no larger. :func:`conv_power_iteration` gives
  the (lower) power-iteration estimate of the true norm for comparison.
- ReLU, softplus, tanh, Flatten, Identity, Dropout (eval): 1. Max-pooling: ``sqrt(c)`` with ``c``
  the number of windows covering one input (1 for the usual non-overlapping 2x2 pooling).
For ``p = inf``, ``||d||_2 <= sqrt(D) ||d||_inf`` multiplies ``L_k`` by ``sqrt(D)`` (loose); for a
linear model the exact dual norm ``||w_y - w_k||_q`` is used instead, so the bound is the exact margin.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.core.norms import Norm
from marginlab.estimators.base import Estimator, MarginKind, register
from marginlab.estimators.first_order import min_ratio
from marginlab.nets.models import MarginNet

_ONE_LIPSCHITZ = (nn.ReLU, nn.Softplus, nn.Tanh, nn.Flatten, nn.Identity, nn.Dropout)


def split_layers(model: nn.Module) -> tuple[list[nn.Module], nn.Linear]:
    """``(layers of Φ in order, head)`` for a MarginNet or an ``nn.Sequential`` ending in Linear."""
    if isinstance(model, MarginNet):
        return _flatten(model.phi), model.head
    layers = _flatten(model) if isinstance(model, nn.Sequential) else []
    head = layers[-1] if layers else None
    if not isinstance(head, nn.Linear):
        raise ConfigError("lipschitz needs a MarginNet or an nn.Sequential ending in nn.Linear")
    return layers[:-1], head


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _flatten(child)]
    return [module]


def conv_spectral_bound(conv: nn.Conv2d, in_hw: tuple[int, int]) -> float:
    """Upper bound of the L2 operator norm of ``conv`` on inputs of spatial size ``in_hw``."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ConfigError("lipschitz supports Conv2d with groups=1 and dilation=1 only")
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):  # "valid" adds nothing; "same" at most k-1 per dimension
        pad_h, pad_w = (0, 0) if conv.padding == "valid" else (kh - 1, kw - 1)
    else:
        pad_h, pad_w = 2 * conv.padding[0], 2 * conv.padding[1]
    grid = (in_hw[0] + pad_h, in_hw[1] + pad_w)
    spectrum = torch.fft.fft2(conv.weight.detach().double(), s=grid)  # [O, I, H', W']
    return float(torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max())


def conv_power_iteration(conv: nn.Conv2d, in_shape: tuple[int, int, int], iters: int = 100) -> float:
    """Power-iteration estimate (from below) of the L2 norm of ``conv`` (bias ignored) on ``in_shape``."""
    if isinstance(conv.padding, str):  # conv_transpose2d, the adjoint, takes numbers only
        raise ConfigError(f"conv_power_iteration needs numeric padding, got padding={conv.padding!r}")
    weight, stride, padding = conv.weight.detach().double(), conv.stride, conv.padding
    v = torch.randn(1, *in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = 0.0
    for _ in range(iters):
        v = v / v.norm()
        u = F.conv2d(v, weight, stride=stride, padding=padding)
        sigma = float(u.norm())
        extra = _output_padding(conv, in_shape, u)
        v = F.conv_transpose2d(u, weight, stride=stride, padding=padding, output_padding=extra)
    return sigma


def _output_padding(conv: nn.Conv2d, in_shape: tuple[int, int, int], u: torch.Tensor) -> tuple[int, int]:
    """Extra rows/cols conv_transpose2d needs to map back onto exactly ``in_shape`` (strided convs)."""
    pads = conv.padding if not isinstance(conv.padding, str) else (0, 0)
    out = []
    for i in range(2):
        back = (u.shape[2 + i] - 1) * conv.stride[i] - 2 * pads[i] + conv.kernel_size[i]
        out.append(in_shape[1 + i] - back)
    return out[0], out[1]


def _pool_factor(pool: nn.MaxPool2d) -> float:
    k = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,) * 2
    s = pool.stride if isinstance(pool.stride, tuple) else (pool.stride,) * 2
    if pool.dilation not in (1, (1, 1)):
        raise ConfigError("lipschitz supports MaxPool2d with dilation=1 only")
    return math.sqrt(math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1]))


def feature_lipschitz(layers: list[nn.Module], x1: torch.Tensor) -> float:
    """Upper bound of the L2 Lipschitz constant of ``layers`` (in order) on inputs like ``x1 [1,...]``."""
    bound = 1.0
    h = x1
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                bound *= float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
            elif isinstance(layer, nn.Conv2d):
                bound *= conv_spectral_bound(layer, (h.shape[-2], h.shape[-1]))
            elif isinstance(layer, nn.MaxPool2d):
                bound *= _pool_factor(layer)
            elif not isinstance(layer, _ONE_LIPSCHITZ):
                raise ConfigError(f"lipschitz cannot bound layer {type(layer).__name__}")
            h = layer(h)
    return bound


@register("lipschitz")
@dataclass(kw_only=True)
class Lipschitz(Estimator):
    """Certified lower bound ``min_k (f_y - f_k)(x) / L_k``; exact on linear models."""

    kind = MarginKind.LOWER
    needs = frozenset({"layers"})
    # a lower bound of the R^d margin bounds the (larger) box margin too: both domains
    domains = frozenset({"box", "rd"})

    def _prepare(self, model: nn.Module, x1: torch.Tensor, p: float) -> None:
        layers, head = split_layers(model)
        weighted = any(isinstance(m, nn.Linear | nn.Conv2d) for m in layers)
        w = head.weight.detach().double()
        diff = w[:, None, :] - w[None, :, :]  # [K(y), K(k), F]: rows w_y - w_k
        if not weighted:  # linear model: exact dual norm, any p
            self._lip = torch.linalg.vector_norm(diff, ord=Norm.parse(p).q, dim=2)
            return
        scale = feature_lipschitz(layers, x1)
        if p == math.inf:
            scale *= math.sqrt(x1[0].numel())
        self._lip = torch.linalg.vector_norm(diff, ord=2, dim=2) * scale

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        with torch.no_grad():
            logits = model(x).double()
        gaps = logits.gather(1, y[:, None]) - logits
        return min_ratio(gaps, self._lip.to(x.device)[y], y)
