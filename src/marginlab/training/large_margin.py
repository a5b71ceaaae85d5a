"""The large-margin loss (Elsayed et al. 2018, "Large Margin Deep Networks for Classification"), as the
official code (google-research ``large_margin/margin_loss.py``, ``train.py``, ``mnist/mnist_config.py``)
computes it; docs/training-methods.md (``## large-margin``) lists the reference values and deviations.

For a layer ``h`` of the network (the input, hidden activations, the features Φ(x)) and each of the
``top_k`` strongest wrong classes ``k``, the first-order distance to the boundary between ``y`` and ``k``
measured at ``h`` is ``d_k = (o_y - o_k) / (||grad_h (o_y - o_k)||_q / s_h + eps)``, with ``o`` the
softmax probabilities (official) or the logits, ``q`` the dual exponent of the attack norm and ``s_h``
the layer's size (``scale = "size"``, official ``layers_weights`` in L∞) or 1 (``"none"``). The loss per
point is the hinge ``max(0, gamma - max(d, gamma (1 - alpha)))`` of the smallest ``d_k``
(``aggregate = "min"``, official ``worst_case_loss``) or summed over the ``k`` (``"sum"``); mean over
the batch, then over the layers.
``approximate = True`` (official) treats the gradient norm as a constant (one extra backward per class);
``False`` back-propagates through it (double backprop, ``create_graph=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.core.norms import Norm
from marginlab.training.objectives import (
    OBJECTIVES,
    BuildContext,
    Objective,
    StepInfo,
    StepLoss,
    full_precision,
)

LAYERS = ("input", "hidden", "features")
OUTPUTS = ("probs", "logits")
AGGREGATES = ("min", "sum")
SCALES = ("size", "none")
# Official values (mnist_config.py, train.py); the same for every dataset and norm here.
_DEFAULTS: dict[str, Any] = {
    "norm": "Linf",
    "gamma": 10000.0,
    "alpha": 4.0,
    "top_k": 1,
    "layers": "input,hidden",
    "output": "probs",
    "aggregate": "min",
    "approximate": True,
    "ce_weight": 0.0,
    "weight": None,  # per norm, _WEIGHT (the official 1.0 is for RMSProp, which ignores the loss scale)
    "eps": 1e-6,
    "scale": None,  # official: "size" (divide the dual norm by the layer's size) in L∞, "none" otherwise
}
# The loss's weight for this loop's SGD (Nesterov momentum 0.9) at the recipes' lr 0.01: the official
# code trains with RMSProp and clips gradients at global norm 5, both blind to the loss scale; SGD is not.
# Probes on MNIST-sized digits (28x28, MLP 784-1024-10, 20 epochs of 1,347 images): in L∞ weight 0.15
# diverged (every point saturated at alpha gamma), 0.05 and 0.01 trained; in L2 weight 3 collapsed (the
# softmax saturated, every distance beyond gamma), 1 trained. L1 borrows L2's (not probed).
_WEIGHT = {Norm.Linf: 0.02, Norm.L2: 0.5, Norm.L1: 0.5}
_ACTIVATIONS = (nn.ReLU, nn.Softplus, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid)


def _number(params: dict[str, Any], key: str, *, low: float, strict: bool) -> None:
    v = params[key]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < low or (strict and v == low):
        bound = f"{'>' if strict else '>='} {low:g}"
        raise ConfigError(f"large-margin {key} must be a finite number {bound}, got {v!r}")
    params[key] = float(v)


def _choice(params: dict[str, Any], key: str, choices: tuple[str, ...]) -> None:
    if params[key] not in choices:
        raise ConfigError(f"large-margin {key} must be one of {list(choices)}, got {params[key]!r}")


def parse_layers(value: Any) -> tuple[str, ...]:
    """``"input,hidden"`` (or a list) -> ``("input", "hidden")``, checked against :data:`LAYERS`."""
    names = (
        value.split(",")
        if isinstance(value, str)
        else list(value)
        if isinstance(value, list | tuple)
        else [value]
    )
    out = tuple(dict.fromkeys(str(n).strip() for n in names))
    if not out or any(n not in LAYERS for n in out):
        raise ConfigError(
            f"large-margin layers must be a comma-separated subset of {list(LAYERS)}, got {value!r}"
        )
    return out


def _hidden_modules(model: nn.Module) -> list[nn.Module]:
    """The activation modules inside ``model.phi`` (``model`` itself without one), in order."""
    phi = getattr(model, "phi", model)
    return [m for m in phi.modules() if isinstance(m, _ACTIVATIONS)]


def first_order_distances(
    diff: Tensor, layer: Tensor, q: float, scale: float, eps: float, create_graph: bool
) -> Tensor:
    """``diff [B,k] / (||grad_layer diff[:, i]||_q / scale + eps)`` [B,k] for ``layer [B,...]``; points are
    independent, so the gradient of each column's sum is each point's gradient. Without
    ``create_graph`` the norms are constants (the official ``use_approximation``)."""
    norms = []
    for i in range(diff.shape[1]):
        (g,) = torch.autograd.grad(diff[:, i].sum(), layer, create_graph=create_graph, retain_graph=True)
        norms.append(torch.linalg.vector_norm(g.flatten(1), ord=q, dim=1) / scale)
    return diff / (torch.stack(norms, dim=1) + eps)


@OBJECTIVES.register("large-margin")
class LargeMargin(Objective):
    """``ce_weight ce + weight margin_loss`` with the multi-layer large-margin loss (module docstring)."""

    name = "large-margin"

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.norm = Norm.parse(params["norm"])
        self.gamma, self.alpha = float(params["gamma"]), float(params["alpha"])
        self.top_k = int(params["top_k"])
        self.layers = parse_layers(params["layers"])
        self.output, self.aggregate = str(params["output"]), str(params["aggregate"])
        self.approximate = bool(params["approximate"])
        self.by_size = params["scale"] == "size"
        self.ce_weight, self.weight, self.eps = (
            float(params["ce_weight"]),
            float(params["weight"]),
            float(params["eps"]),
        )

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], ctx: BuildContext) -> dict[str, Any]:
        """Fill every unset parameter with the official value; check them (one-line :class:`ConfigError`)."""
        unknown = [k for k in params if k not in _DEFAULTS]
        if unknown:
            known = ", ".join(_DEFAULTS)
            raise ConfigError(f"unknown parameter {unknown[0]!r} of recipe 'large-margin'; known: {known}")
        out = {**_DEFAULTS, **params}
        out["norm"] = str(
            Norm.parse(out["norm"], error="large-margin norm must be L1, L2 or Linf, got {value!r}")
        )
        _number(out, "gamma", low=0.0, strict=True)
        _number(out, "alpha", low=0.0, strict=True)
        _number(out, "ce_weight", low=0.0, strict=False)
        if out["weight"] is None:
            out["weight"] = _WEIGHT[Norm(out["norm"])]
        _number(out, "weight", low=0.0, strict=False)
        _number(out, "eps", low=0.0, strict=False)
        k = out["top_k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"large-margin top_k must be a positive integer, got {k!r}")
        out["layers"] = ",".join(parse_layers(out["layers"]))
        _choice(out, "output", OUTPUTS)
        _choice(out, "aggregate", AGGREGATES)
        if out["scale"] is None:
            out["scale"] = "size" if out["norm"] == Norm.Linf else "none"
        _choice(out, "scale", SCALES)
        if not isinstance(out["approximate"], bool):
            raise ConfigError(f"large-margin approximate must be true or false, got {out['approximate']!r}")
        return out

    @classmethod
    def build(cls, params: Mapping[str, Any], ctx: BuildContext) -> LargeMargin:
        """The large-margin objective for resolved ``params``."""
        return cls(params)

    def term_names(self) -> tuple[str, ...]:
        """``("large_margin",)``: the weighted margin loss."""
        return ("large_margin",)

    def _forward(self, net: nn.Module, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits ``[B,K]`` and the chosen layers' tensors (input, hidden activations, features)."""
        hidden: list[Tensor] = []
        handles = []
        if "hidden" in self.layers:
            for m in _hidden_modules(model):
                handles.append(m.register_forward_hook(lambda _m, _i, out: hidden.append(out)))
        x_in = x.detach().clone().requires_grad_("input" in self.layers)
        try:
            feats, logits = net(x_in)
        finally:
            for h in handles:
                h.remove()
        layers = [x_in] if "input" in self.layers else []
        layers += hidden
        if "features" in self.layers:
            layers.append(feats)
        unique = list({id(t): t for t in layers}.values())  # an MLP's last activation is its features
        if not unique:
            raise ConfigError(f"large-margin found no layer {list(self.layers)} in {type(model).__name__}")
        return logits.float(), unique

    def margin_loss(self, logits: Tensor, layers: list[Tensor], y: Tensor) -> Tensor:
        """The large-margin loss (scalar) of ``logits [B,K]`` for labels ``y [B]`` at ``layers``."""
        out = logits.softmax(dim=1) if self.output == "probs" else logits
        others = out.scatter(1, y[:, None], -math.inf)
        k = min(self.top_k, out.shape[1] - 1)
        top = others.topk(k, dim=1).values  # [B,k]
        diff = out.gather(1, y[:, None]) - top
        q = self.norm.q
        losses = []
        for layer in layers:
            scale = float(layer[0].numel()) if self.by_size else 1.0
            d = first_order_distances(diff, layer, q, scale, self.eps, create_graph=not self.approximate)
            if self.aggregate == "min":
                d = d.min(dim=1, keepdim=True).values
            hinge = F.relu(self.gamma - torch.clamp(d, min=self.gamma * (1 - self.alpha)))
            losses.append(hinge.sum(dim=1).mean())
        return torch.stack(losses).mean()

    def __call__(self, net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, at: StepInfo) -> StepLoss:
        """``ce_weight ce + weight margin_loss`` of the batch ``x [B,C,H,W]``, ``y [B]``."""
        logits, layers = self._forward(net, model, x)
        with full_precision(x):  # the losses in float32 under the loop's mixed precision
            ce = F.cross_entropy(logits, y)
            term = self.weight * self.margin_loss(logits, layers, y)
        return StepLoss(self.ce_weight * ce + term, ce, logits, {"large_margin": term})
