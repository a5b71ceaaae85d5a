"""The training recipes: which objective and loss terms each uses, and their reference values.

A recipe (:data:`RECIPES`) names a training objective of :mod:`marginlab.training.objectives` (what a step
minimises) and a set of the loss terms of :mod:`marginlab.training.regularizers`: the poster's recipes
(``standard``, ``constraint``, ``regularized``) are the clean cross-entropy plus terms; ``pgd-at`` and
``trades`` (:mod:`marginlab.training.adversarial`) are the methods a reviewer compares them with.
:class:`RegularizerConfig` picks a recipe, optionally its weights and its objective's ``params``;
:func:`resolve_config` fills the unset ones with the reference values (λ = 0.1, β = 1e-3, γ per model from
:func:`reference_gamma`, the objective's :meth:`~marginlab.training.objectives.Objective.resolve_params`),
:func:`build_objective` turns the result into what the training loop calls, and :func:`reference_lr` is
the recipe's SGD learning rate. The values and their sources: docs/reference-settings.md.

A new method registers its :class:`~marginlab.training.objectives.Objective` subclass in ``OBJECTIVES``
and becomes a recipe with one line here: ``"name": Recipe(objective=TheClass.name)`` (importing its
module registers it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from marginlab.base.errors import ConfigError
from marginlab.training.adversarial import PgdAt, Trades
from marginlab.training.certified import CrownIbp, Ibp
from marginlab.training.large_margin import LargeMargin
from marginlab.training.mma import MMA
from marginlab.training.objectives import (
    OBJECTIVES,
    BuildContext,
    CrossEntropy,
    Objective,
    dataset_family,
)
from marginlab.training.regularizers import REGULARIZERS, Regularizer


@dataclass(frozen=True)
class Recipe:
    """A recipe: its training ``objective`` (a name of ``OBJECTIVES``), the loss ``terms`` (names of
    ``REGULARIZERS``) the objective is given, and its reference SGD learning rate ``lr``."""

    objective: str = CrossEntropy.name
    terms: tuple[str, ...] = ()
    lr: float = 0.01


# The reference's recipes (train.sh: SGD 0.01, 0.002 with the margin term) and the methods compared with
# them; the new methods take the poster's 0.01 (their papers train other models with other optimizers).
RECIPES: dict[str, Recipe] = {
    "standard": Recipe(),
    "constraint": Recipe(terms=("orthogonality",)),
    "regularized": Recipe(terms=("average-margin", "orthogonality"), lr=0.002),
    "pgd-at": Recipe(objective=PgdAt.name),
    "trades": Recipe(objective=Trades.name),
    "ibp": Recipe(objective=Ibp.name),
    "crown-ibp": Recipe(objective=CrownIbp.name),
    "mma": Recipe(objective=MMA.name),
    "large-margin": Recipe(objective=LargeMargin.name),
}
_REF_LAM, _REF_BETA = 0.1, 1e-3
# γ per reference model (train.sh of the reference code): MNIST LR/MLP 5, MNIST CNN 40, CIFAR LR 5,
# CIFAR MLP/CNN 10.
_REF_GAMMA = (
    dict.fromkeys(["mnist-lr", "mnist-mlp", "cifar-lr"], 5.0) | {"mnist-cnn": 40.0}
) | dict.fromkeys(["cifar-mlp", "cifar-cnn"], 10.0)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name raises a one-line :class:`ConfigError`."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose from: {', '.join(RECIPES)}")
    return RECIPES[name]


def reference_gamma(model_name: str, dataset: str | None = None) -> float:
    """The reference's clipping level γ for ``model_name`` (``mnist-cnn``...).

    Generic names (``lr``, ``mlp``, ``cnn``) need ``dataset``; Fashion-MNIST has no reference value and
    borrows MNIST's (an analogue, not a published setting).
    """
    name = model_name.lower()
    if name in ("lr", "mlp", "cnn") and dataset is not None:
        family = dataset_family(dataset)
        if family is not None:
            name = f"{family}-{name}"
    if name not in _REF_GAMMA:
        raise ConfigError(
            f"no reference gamma for model {model_name!r}"
            f"{f' on {dataset!r}' if dataset else ''}; set gamma explicitly (reference: {_REF_GAMMA})"
        )
    return _REF_GAMMA[name]


def reference_lr(recipe: str, model_name: str | None = None) -> float:
    """The recipe's reference SGD learning rate (:attr:`Recipe.lr`): 0.01 standard and constraint, 0.002
    regularized, 0.01 for the other methods. The reference trains its standard CIFAR-CNN with 0.005.
    """
    lr = get_recipe(recipe).lr
    return 0.005 if recipe == "standard" and model_name == "cifar-cnn" else lr


@dataclass(frozen=True)
class RegularizerConfig:
    """Which recipe to train with. ``recipe`` picks the objective and its terms; ``None`` weights take the
    reference values. ``params``: the recipe objective's hyperparameters (TOML ``[regularizer.params]``,
    e.g. ``eps``, ``steps`` of ``pgd-at``); unset ones take the objective's reference values, which
    :func:`resolve_config` records (so ``config.json`` holds every value that ran).

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
    params: dict[str, Any] = field(default_factory=dict)

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
        if not isinstance(self.params, dict):
            raise ConfigError(f"regularizer.params must be a table, got {self.params!r}")
        terms = RECIPES[self.recipe].terms
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
    """Fill unset weights with the reference values (γ from ``model_name``/``dataset``) and the objective's
    ``params`` with its reference values (:meth:`~marginlab.training.objectives.Objective.resolve_params`:
    an unknown or invalid one raises a one-line :class:`ConfigError`)."""
    rec = RECIPES[cfg.recipe]
    terms = rec.terms
    ctx = BuildContext(dataset=dataset, model_name=model_name, seed=cfg.seed)
    out = replace(cfg, params=OBJECTIVES.get(rec.objective).resolve_params(cfg.params, ctx))
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
    return [REGULARIZERS.get(name).from_config(cfg) for name in RECIPES[cfg.recipe].terms]


def build_objective(
    cfg: RegularizerConfig, model_name: str | None = None, dataset: str | None = None, seed: int = 0
) -> Objective:
    """What the training loop minimises for ``cfg``: the recipe's objective built from the resolved params,
    with its loss terms; ``seed`` (the run's) seeds the objective's own generator (random starts)."""
    cfg = resolve_config(cfg, model_name, dataset)
    ctx = BuildContext(dataset, model_name, seed, tuple(build_regularizers(cfg, model_name, dataset)))
    return OBJECTIVES.get(RECIPES[cfg.recipe].objective).build(cfg.params, ctx)
