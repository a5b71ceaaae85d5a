"""Certified training: the objectives ``ibp`` (Gowal et al. 2018) and ``crown-ibp`` (Zhang et al. 2020).

Both minimise ``kappa * CE(f(x), y) + (1 - kappa) * CE(-L, y)``, where ``L [B,K]`` holds certified lower
bounds of the logit gaps ``f_y - f_k`` over the ball of radius ``eps`` around each input, intersected
with the image box (:mod:`marginlab.training.ibp`; 0 at ``k = y``): the cross-entropy of the worst-case
logits. ``ibp`` takes IBP's bounds; ``crown-ibp`` the mixture ``beta * CROWN-IBP + (1 - beta) * IBP``.

The schedule, as fractions of the run's optimizer steps (so a short run keeps the paper's shape): a
warm-up (``eps = 0``, ``kappa = 1``: clean training), then a linear ramp in which ``eps`` grows from 0 to
``eps_train`` and ``kappa``, ``beta`` move linearly from their start to their final values (in the
official code of both papers they are tied to ``eps / eps_train``, the same thing), then constant.

Reference values (docs/reference-settings.md):

- ``ibp`` (Gowal et al. 2018, MNIST): 60k steps, warm-up 2k steps (1/30 of the run), ramp 10k steps
  (1/6), ``kappa`` 1 -> 0.5;
- ``crown-ibp`` (Zhang et al. 2020, MNIST, the official config ``mnist_dm-large_0.4.json``): 200 epochs,
  ``schedule_start`` 10 (warm-up 0.05 of the run), ``schedule_length`` 51 (the ramp lasts 50 epochs,
  0.25), ``kappa`` 1 -> 0 and ``beta`` 1 -> 0 (``final-beta`` 0);
- ``eps_train`` (both papers, MNIST L-inf): 0.2 for eps 0.1, 0.4 for eps 0.2, 0.3 and 0.4, i.e.
  ``min(2 eps, max(eps, 0.4))``; CIFAR-10 L-inf: ``1.1 eps`` (8.8/255 for 8/255); no reference for L2
  or other data: ``eps_train = eps``;
- ``eps`` itself: MNIST L-inf 0.3, CIFAR-10 L-inf 8/255; L2 (no published certified-training setting
  for these models) the radius of ``pgd-at``: MNIST 2.0, CIFAR-10 0.5; other data: it must be given.
  Fashion-MNIST takes MNIST's values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.domain import parse_domain
from marginlab.core.norms import Norm
from marginlab.training.ibp import (
    TrainingBall,
    chain_layers,
    crown_ibp_margin_lower,
    ibp_margin_lower,
    interval_bounds,
    worst_case_logits,
)
from marginlab.training.objectives import (
    OBJECTIVES,
    BuildContext,
    Objective,
    StepInfo,
    StepLoss,
    dataset_family,
    full_precision,
)
from marginlab.training.regularizers import Regularizer

__all__ = ["CertifiedSchedule", "CrownIbp", "Ibp", "reference_eps", "reference_eps_train"]

_BETA_OFF = 1e-5  # below this CROWN-IBP's share is not computed (as the official code)
# (dataset family, norm) -> the evaluation radius eps: L-inf the papers'; L2 (no published certified
# training setting for these models) the radius of pgd-at's reference (training/adversarial.py)
_REF_EPS = {
    ("mnist", Norm.Linf): 0.3,
    ("cifar", Norm.Linf): 8 / 255,
    ("mnist", Norm.L2): 2.0,
    ("cifar", Norm.L2): 0.5,
}


def reference_eps(dataset: str | None, norm: Norm) -> float:
    """The reference evaluation radius (``_REF_EPS``) of ``dataset``'s family; :class:`ConfigError` else."""
    value = _REF_EPS.get((dataset_family(dataset) or "", norm))
    if value is None:
        raise ConfigError(f"no reference eps for certified training on {dataset!r} in {norm}; set eps")
    return value


def reference_eps_train(eps: float, dataset: str | None, norm: Norm) -> float:
    """The training radius of both papers for evaluation radius ``eps`` (module docstring)."""
    family = dataset_family(dataset)
    if norm is Norm.Linf and family == "mnist":
        return min(2 * eps, max(eps, 0.4))
    if norm is Norm.Linf and family == "cifar":
        return 1.1 * eps
    return eps


@dataclass(frozen=True)
class CertifiedSchedule:
    """``eps``, ``kappa`` and ``beta`` over the run: warm-up for the fraction ``warmup`` of the steps,
    then a linear ramp over the fraction ``ramp``, then the final values."""

    eps_train: float
    warmup: float
    ramp: float
    kappa_start: float
    kappa_final: float
    beta_start: float = 1.0
    beta_final: float = 1.0

    def progress(self, at: StepInfo) -> float:
        """Where the ramp is at step ``at``: 0 during the warm-up, 1 after the ramp."""
        done = at.fraction - self.warmup
        if self.ramp <= 0:
            return 1.0 if done >= 0 else 0.0
        return min(max(done / self.ramp, 0.0), 1.0)

    def at(self, at: StepInfo) -> tuple[float, float, float]:
        """``(eps, kappa, beta)`` at step ``at``."""
        r = self.progress(at)
        kappa = self.kappa_start + r * (self.kappa_final - self.kappa_start)
        return r * self.eps_train, kappa, self.beta_start + r * (self.beta_final - self.beta_start)


def _number(params: Mapping[str, Any], key: str, default: float, lo: float, hi: float, name: str) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= float(value) <= hi:
        raise ConfigError(f"{name} parameter {key} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


class Certified(Objective):
    """Shared by ``ibp`` and ``crown-ibp`` (module docstring); subclasses set the reference schedule."""

    warmup: ClassVar[float]
    ramp: ClassVar[float]
    kappa_final: ClassVar[float]
    mixes_crown: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, Any], regularizers: tuple[Regularizer, ...] = ()) -> None:
        self.norm = Norm.parse(params["norm"])
        self.box = params["domain"] == "box"
        self.schedule = CertifiedSchedule(
            params["eps_train"], params["warmup"], params["ramp"], params["kappa_start"],
            params["kappa_final"], params.get("beta_start", 0.0), params.get("beta_final", 0.0),
        )  # fmt: skip
        self.regularizers = list(regularizers)

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], ctx: BuildContext) -> dict[str, Any]:
        """Check ``params`` and fill the reference values (module docstring); ``eps`` is the evaluation
        radius, ``eps_train`` the training radius the ramp reaches."""
        keys = {"eps", "eps_train", "norm", "domain", "warmup", "ramp", "kappa_start", "kappa_final"}
        keys |= {"beta_start", "beta_final"} if cls.mixes_crown else set()
        unknown = sorted(set(params) - keys)
        if unknown:
            raise ConfigError(
                f"training objective {cls.name!r} has no parameter {unknown}; known: {sorted(keys)}"
            )
        norm = Norm.parse(params.get("norm", "inf"), among=(Norm.L2, Norm.Linf))
        eps = params.get("eps")
        eps = (
            reference_eps(ctx.dataset, norm)
            if eps is None
            else _number(params, "eps", 0, 0, math.inf, cls.name)
        )
        default_train = reference_eps_train(eps, ctx.dataset, norm)
        out: dict[str, Any] = {
            "eps": eps,
            "eps_train": _number(params, "eps_train", default_train, 0, math.inf, cls.name),
            "norm": str(norm),
            "domain": parse_domain(params.get("domain", "box")),
            "warmup": _number(params, "warmup", cls.warmup, 0, 1, cls.name),
            "ramp": _number(params, "ramp", cls.ramp, 0, 1, cls.name),
            "kappa_start": _number(params, "kappa_start", 1.0, 0, 1, cls.name),
            "kappa_final": _number(params, "kappa_final", cls.kappa_final, 0, 1, cls.name),
        }
        if cls.mixes_crown:
            out["beta_start"] = _number(params, "beta_start", 1.0, 0, 1, cls.name)
            out["beta_final"] = _number(params, "beta_final", 0.0, 0, 1, cls.name)
        if out["warmup"] + out["ramp"] > 1:
            raise ConfigError(f"{cls.name}: warmup + ramp must be at most 1 (fractions of the run), "
                              f"got {out['warmup']} + {out['ramp']}")  # fmt: skip
        return out

    @classmethod
    def build(cls, params: Mapping[str, Any], ctx: BuildContext) -> Certified:
        """The objective for resolved ``params``, with the recipe's loss terms ``ctx.regularizers``."""
        return cls(params, ctx.regularizers)

    def term_names(self) -> tuple[str, ...]:
        """``verified-ce`` (the weighted worst-case cross-entropy), then the regularizers' names."""
        return ("verified-ce", *(r.name for r in self.regularizers))

    def lower_bounds(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, beta: float) -> Tensor:
        """``[B,K-1]`` certified lower bounds of ``f_y - f_k`` over the ``eps`` ball of ``x [B,*in]``,
        in the model's dtype (float32 under mixed precision too), differentiable in the weights."""
        layers = chain_layers(model)
        dtype = next(model.parameters()).dtype
        with full_precision(x):
            ball = TrainingBall(x.to(dtype), eps, self.norm.p, self.box)
            boxes = interval_bounds(layers, ball)
            lower = ibp_margin_lower(layers, boxes, ball, y)
            if beta > _BETA_OFF:
                lower = beta * crown_ibp_margin_lower(layers, boxes, ball, y) + (1 - beta) * lower
        return lower

    def __call__(self, net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, at: StepInfo) -> StepLoss:
        """``kappa * CE(clean) + (1 - kappa) * CE(worst-case logits)`` plus the regularizers' terms."""
        feats, logits = net(x)
        feats, logits = feats.float(), logits.float()
        ce = F.cross_entropy(logits, y)
        eps, kappa, beta = self.schedule.at(at)
        verified = torch.zeros((), device=x.device)
        if kappa < 1:  # during the warm-up the bounds are not needed
            lower = self.lower_bounds(model, x, y, eps, beta)
            verified = (1 - kappa) * F.cross_entropy(worst_case_logits(lower.float(), y), y)
        terms = [verified, *(r(model, feats, logits, y) for r in self.regularizers)]
        objective = kappa * ce + sum(terms, torch.zeros((), device=x.device))
        return StepLoss(objective, ce, logits, dict(zip(self.term_names(), terms, strict=True)))


@OBJECTIVES.register("ibp")
class Ibp(Certified):
    """IBP certified training (Gowal et al. 2018): interval bounds, ``kappa`` 1 -> 0.5."""

    name = "ibp"
    warmup = 2_000 / 60_000  # MNIST: 2k warm-up steps of 60k
    ramp = 10_000 / 60_000  # MNIST: 10k ramp-up steps
    kappa_final = 0.5


@OBJECTIVES.register("crown-ibp")
class CrownIbp(Certified):
    """CROWN-IBP (Zhang et al. 2020): ``beta`` CROWN-IBP + ``(1 - beta)`` IBP, ``beta`` 1 -> 0,
    ``kappa`` 1 -> 0."""

    name = "crown-ibp"
    warmup = 10 / 200  # MNIST: schedule_start 10 of 200 epochs
    ramp = 50 / 200  # MNIST: schedule_length 51 (eps reaches eps_train after 50 epochs)
    kappa_final = 0.0
    mixes_crown = True
