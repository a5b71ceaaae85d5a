"""The reference's training recipes: which loss terms each switches on and their reference weights.

A recipe (``standard``, ``constraint``, ``regularized``) names a set of the loss terms of
:mod:`marginlab.training.regularizers`; :class:`RegularizerConfig` picks a recipe and optionally its
weights, :func:`resolve_config` fills the unset ones with the reference values (λ = 0.1, β = 1e-3, γ per
model from :func:`reference_gamma`), and :func:`build_regularizers` turns the result into the terms the
training loop adds to the mean cross-entropy. :func:`reference_lr` is the recipe's SGD learning rate.
The values are the reference code's (``train.sh``; docs/reference-settings.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from marginlab.base.errors import ConfigError
from marginlab.training.regularizers import REGULARIZERS, Regularizer

# Which regularizers each of the reference's recipes switches on.
RECIPES: dict[str, tuple[str, ...]] = {
    "standard": (),
    "constraint": ("orthogonality",),
    "regularized": ("average-margin", "orthogonality"),
}
_REF_LAM, _REF_BETA = 0.1, 1e-3
# γ per reference model (train.sh of the reference code): MNIST LR/MLP 5, MNIST CNN 40, CIFAR LR 5,
# CIFAR MLP/CNN 10.
_REF_GAMMA = (
    dict.fromkeys(["mnist-lr", "mnist-mlp", "cifar-lr"], 5.0) | {"mnist-cnn": 40.0}
) | dict.fromkeys(["cifar-mlp", "cifar-cnn"], 10.0)
_DATASET_FAMILY = {"mnist": "mnist", "fashion-mnist": "mnist", "cifar10": "cifar"}


def reference_gamma(model_name: str, dataset: str | None = None) -> float:
    """The reference's clipping level γ for ``model_name`` (``mnist-cnn``...).

    Generic names (``lr``, ``mlp``, ``cnn``) need ``dataset``; Fashion-MNIST has no reference value and
    borrows MNIST's (an analogue, not a published setting).
    """
    name = model_name.lower()
    if name in ("lr", "mlp", "cnn") and dataset is not None:
        family = _DATASET_FAMILY.get(dataset.split(":", 1)[0].lower())
        if family is not None:
            name = f"{family}-{name}"
    if name not in _REF_GAMMA:
        raise ConfigError(
            f"no reference gamma for model {model_name!r}"
            f"{f' on {dataset!r}' if dataset else ''}; set gamma explicitly (reference: {_REF_GAMMA})"
        )
    return _REF_GAMMA[name]


def reference_lr(recipe: str, model_name: str | None = None) -> float:
    """The reference's SGD learning rate: 0.01 standard and constraint, 0.002 regularized.

    The reference trains its standard CIFAR-CNN with 0.005 instead.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from: {', '.join(RECIPES)}")
    if recipe == "regularized":
        return 0.002
    return 0.005 if recipe == "standard" and model_name == "cifar-cnn" else 0.01


@dataclass(frozen=True)
class RegularizerConfig:
    """Which loss terms to add. ``recipe`` picks the terms; ``None`` weights take the reference values.

    ``ortho_layers``: ``"all"`` (every Linear/Conv weight, head included, as the reference), ``"hidden"``
    (all but ``model.head``), or comma-separated module names. ``ortho_every = k`` applies the penalty's
    gradient every k-th step, scaled by k (the value, which the loop logs, is the last computed one);
    ``ortho_probes = p > 0`` replaces the exact penalty by an unbiased estimate from p Gaussian probes.
    ``ortho_every = 1, ortho_probes = 0`` is the reference's exact penalty on every step.

    Default ``ortho_every = 50`` (exact penalty, closed-form gradient, every 50th step): on MNIST-MLP the
    exact penalty on every step costs 3.4-3.5x a standard epoch (its Gram matrix is 784 x 784 over 1024
    rows; 4.6x with autograd's gradient), every 50th step 1.01-1.08x, every 25th 1.14x. Probes touch the
    whole weight matrix on every step, which costs 1.3-1.5x even with one probe. On MNIST-CNN even the
    exact penalty is cheap (<= 1.04x). Over 3 paired seeds (MNIST-MLP, benchmarks/bench_ortho_default.py)
    the mean margin and robust accuracy match the exact penalty's within paired noise; the final penalty
    does not: it is 0.4% higher (+2.2 on 611, where no penalty ends at 696; every 25th step: +0.34),
    the drift of the steps since the last application. With a β much larger than the reference's 1e-3
    lower ``ortho_every`` (the applied step is k times larger).
    """

    recipe: str = "standard"
    lam: float | None = None
    gamma: float | None = None
    beta: float | None = None
    normalized: bool = False
    ortho_layers: str = "all"
    ortho_every: int = 50
    ortho_probes: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(
                f"unknown regularizer recipe {self.recipe!r}; choose from: {', '.join(RECIPES)}"
            )
        for key in ("lam", "gamma", "beta"):
            value = getattr(self, key)
            if value is not None and (
                not isinstance(value, int | float) or not math.isfinite(value) or value < 0
            ):
                raise ConfigError(f"regularizer {key} must be a finite number >= 0, got {value!r}")
        if self.gamma == 0:
            raise ConfigError("regularizer gamma must be > 0 (it is the clipping level of the margin term)")
        terms = RECIPES[self.recipe]
        for key, term in (("lam", "average-margin"), ("gamma", "average-margin"), ("beta", "orthogonality")):
            if getattr(self, key) is not None and term not in terms:
                fix = "'regularized'" if term == "average-margin" else "'constraint' or 'regularized'"
                raise ConfigError(
                    f"recipe {self.recipe!r} has no {term} term, so {key} cannot be set; use {fix}"
                )
        if self.ortho_every < 1 or self.ortho_probes < 0:
            raise ConfigError("ortho_every must be >= 1 and ortho_probes >= 0")


def resolve_config(
    cfg: RegularizerConfig, model_name: str | None = None, dataset: str | None = None
) -> RegularizerConfig:
    """Fill unset weights with the reference values (γ from ``model_name``/``dataset``)."""
    terms = RECIPES[cfg.recipe]
    out = cfg
    if "average-margin" in terms:
        if cfg.gamma is None and model_name is None:
            raise ConfigError(
                "recipe 'regularized' needs gamma (or a model name to take the reference gamma)"
            )
        gamma = cfg.gamma if cfg.gamma is not None else reference_gamma(model_name or "", dataset)
        out = replace(out, lam=_REF_LAM if cfg.lam is None else cfg.lam, gamma=gamma)
    if "orthogonality" in terms:
        out = replace(out, beta=_REF_BETA if cfg.beta is None else cfg.beta)
    return out


def build_regularizers(
    cfg: RegularizerConfig, model_name: str | None = None, dataset: str | None = None
) -> list[Regularizer]:
    """The loss terms of ``cfg.recipe``, with reference weights where ``cfg`` leaves them unset."""
    cfg = resolve_config(cfg, model_name, dataset)
    return [REGULARIZERS.get(name).from_config(cfg) for name in RECIPES[cfg.recipe]]
