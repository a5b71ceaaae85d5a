"""Adversarial training: PGD adversarial training (Madry et al. 2018) and TRADES (Zhang et al. 2019).

Both solve an inner maximisation by projected gradient ascent (:class:`InnerPgd`) inside the ε-ball of
``x`` in L2 or L∞ intersected with the image box [0, 1], and train on its result:

- ``pgd-at``: ``mean_i CE(f(x_i'), y_i)`` with ``x_i'`` the K-step PGD maximiser of the cross-entropy
  from a random start (uniform in the L∞ box as Madry et al.'s ``mnist_challenge``; for L2 a point on
  the ε-sphere, as the MadryLab ``robustness`` library);
- ``trades``: ``mean_i CE(f(x_i), y_i) + β · KL(p(x) || p(x'))`` (``batchmean``, the official code's
  ``(1 / batch) · KLDivLoss(sum)``), ``x'`` the PGD maximiser of that KL from ``x + 0.001 · N(0, I)``.

The attack runs on the bare model in eval mode (the official TRADES code calls ``model.eval()``; the
``robustness`` library's ``AttackerModel`` does the same for PGD training; Madry et al.'s MNIST model has
no layer that differs), then the loss is taken through the training wrapper in train mode. Random starts
come from the objective's own CPU generator, saved in the checkpoint. Reference parameters, their
sources and where marginlab departs from the official code: docs/reference-settings.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.core.norms import Norm
from marginlab.training.objectives import (
    OBJECTIVES,
    BuildContext,
    Objective,
    ObjectiveState,
    StepInfo,
    StepLoss,
    dataset_family,
    full_precision,
)

_NORMS = (Norm.L2, Norm.Linf)
_SEED_OFFSET = 0x7AD5  # the start generator's seed is the run's plus this: not the data-order stream
_TRADES_NOISE = 0.001  # std of TRADES' Gaussian start (official code)

# (dataset family, norm) -> eps, PGD steps K, step size. L∞: the papers' published settings; L2: see
# docs/reference-settings.md (no published L2 setting for these models; the step is 2.5·ε/K).
PGD_REFERENCE: dict[tuple[str, Norm], dict[str, float]] = {
    ("mnist", Norm.Linf): {"eps": 0.3, "steps": 40, "step_size": 0.01},
    ("mnist", Norm.L2): {"eps": 2.0, "steps": 40, "step_size": 0.125},
    ("cifar", Norm.Linf): {"eps": 8 / 255, "steps": 7, "step_size": 2 / 255},
    ("cifar", Norm.L2): {"eps": 0.5, "steps": 7, "step_size": 0.5 * 2.5 / 7},
}
# TRADES' official code: MNIST eps 0.3, 40 steps of 0.01, beta 1; CIFAR-10 eps 0.031, 10 steps of 0.007,
# beta 6. L2: the same radii as PGD-AT's, the official L2 step 2·ε/K.
TRADES_REFERENCE: dict[tuple[str, Norm], dict[str, float]] = {
    ("mnist", Norm.Linf): {"eps": 0.3, "steps": 40, "step_size": 0.01, "beta": 1.0},
    ("mnist", Norm.L2): {"eps": 2.0, "steps": 40, "step_size": 0.1, "beta": 1.0},
    ("cifar", Norm.Linf): {"eps": 0.031, "steps": 10, "step_size": 0.007, "beta": 6.0},
    ("cifar", Norm.L2): {"eps": 0.5, "steps": 10, "step_size": 0.1, "beta": 6.0},
}


@dataclass(frozen=True)
class InnerPgd:
    """K steps of projected gradient ascent in the ``norm`` ball of radius ``eps`` around ``x``,
    intersected with the box [0, 1]: L∞ steps ``step_size · sign(g)``, L2 steps ``step_size · g / ‖g‖``
    (a zero gradient does not move the point)."""

    norm: Norm
    eps: float
    steps: int
    step_size: float

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """``x_adv [B,...]`` projected onto the ball around ``x [B,...]``, then clipped to the box (the
        clip only moves coordinates towards ``x``, so the result stays in the ball)."""
        if self.norm is Norm.Linf:  # Madry et al.'s order: clip to [x - eps, x + eps], then to [0, 1]
            x_adv = torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps)
        else:
            delta = x_adv - x
            norms = delta.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
            scale = (self.eps / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)
            x_adv = x + delta * scale
        return x_adv.clamp(0.0, 1.0)

    def ascend(self, x_adv: Tensor, grad: Tensor) -> Tensor:
        """One unprojected ascent step from ``x_adv`` along ``grad`` (both ``[B,...]``)."""
        if self.norm is Norm.Linf:
            return x_adv + self.step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
        return x_adv + self.step_size * grad / norms.clamp_min(torch.finfo(norms.dtype).tiny)

    def maximise(
        self, model: nn.Module, x: Tensor, loss: Callable[[Tensor], Tensor], start: Tensor
    ) -> Tensor:
        """The point of the ball ∩ box reached from ``start [B,...]`` by ascending ``loss(logits [B,K])``
        (a scalar: a *sum* over the batch, so each point's step follows its own gradient); detached."""
        x_adv = self.project(x, start).detach()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                value = loss(model(x_adv).float())
            (grad,) = torch.autograd.grad(value, [x_adv])
            x_adv = self.project(x, self.ascend(x_adv.detach(), grad)).detach()
        return x_adv


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, its previous mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Adversarial(Objective):
    """What PGD-AT and TRADES share: parameters, the inner PGD, the start generator and its state."""

    KEYS: ClassVar[tuple[str, ...]] = ("norm", "eps", "steps", "step_size", "random_start")
    REFERENCE: ClassVar[dict[tuple[str, Norm], dict[str, float]]] = PGD_REFERENCE

    def __init__(self, attack: InnerPgd, random_start: bool, seed: int) -> None:
        self.attack = attack
        self.random_start = random_start
        self.gen = torch.Generator().manual_seed(seed + _SEED_OFFSET)

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], ctx: BuildContext) -> dict[str, Any]:
        """``params`` checked, unset ones from the reference of ``ctx.dataset``'s family and the norm
        (default ``Linf``, both papers' main setting); an ``eps`` without ``step_size`` scales the
        reference step by ``eps / reference eps`` (the reference's step-to-radius ratio)."""
        unknown = sorted(set(params) - set(cls.KEYS))
        if unknown:
            raise ConfigError(
                f"unknown parameter {unknown[0]!r} of recipe {cls.name!r}; known: {', '.join(cls.KEYS)}"
            )
        error = f"{cls.name}: norm must be L2 or Linf, got {{value!r}}"
        norm = Norm.parse(params.get("norm", Norm.Linf), among=_NORMS, error=error)
        family = dataset_family(ctx.dataset)
        ref = cls.REFERENCE.get((family, norm)) if family is not None else None
        out: dict[str, Any] = {"norm": str(norm)}
        for key in cls.KEYS[1:]:
            if key in params:
                out[key] = _checked(cls.name, key, params[key])
            elif key == "random_start":
                out[key] = True
            elif ref is None:
                missing = [k for k in cls.KEYS[1:] if k not in params and k != "random_start"]
                raise ConfigError(
                    f"recipe {cls.name!r} has no reference parameters for dataset {ctx.dataset!r}; "
                    f"set {', '.join(missing)} in [regularizer.params]"
                )
            elif key == "step_size" and "eps" in params:  # the reference's step-to-radius ratio
                out[key] = float(ref[key]) * out["eps"] / float(ref["eps"])
            else:
                out[key] = int(ref[key]) if key == "steps" else float(ref[key])
        return out

    def start(self, x: Tensor) -> Tensor:
        """The attack's first point for ``x [B,...]`` (``x`` itself without a random start)."""
        return x

    def term_names(self) -> tuple[str, ...]:
        """No terms beside the objective (PGD-AT)."""
        return ()

    def state_dict(self) -> ObjectiveState:
        """The start generator's state."""
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: ObjectiveState) -> None:
        """Restore the start generator."""
        self.gen.set_state(state["generator"])

    def _noise(self, x: Tensor, gaussian: bool) -> Tensor:
        """Noise shaped like ``x`` from the own generator (drawn on the CPU: the same on every device)."""
        draw = torch.randn if gaussian else torch.rand
        return draw(x.shape, generator=self.gen).to(device=x.device, dtype=x.dtype)


def _checked(recipe: str, key: str, value: Any) -> Any:
    """One parameter value checked for type and range (one-line :class:`ConfigError` otherwise)."""
    if key == "random_start":
        if not isinstance(value, bool):
            raise ConfigError(f"{recipe}: random_start must be true or false, got {value!r}")
        return value
    if key == "steps":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{recipe}: steps must be an integer >= 0, got {value!r}")
        return value
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0:
        raise ConfigError(f"{recipe}: {key} must be a finite number >= 0, got {value!r}")
    return float(value)


def _attack(params: Mapping[str, Any]) -> InnerPgd:
    return InnerPgd(Norm.parse(params["norm"]), params["eps"], params["steps"], params["step_size"])


@OBJECTIVES.register("pgd-at")
class PgdAt(_Adversarial):
    """Madry et al.'s adversarial training: the mean cross-entropy at the K-step PGD maximiser of the
    cross-entropy (the clean batch's loss and logits are logged beside it, from one no-grad pass)."""

    name = "pgd-at"

    @classmethod
    def build(cls, params: Mapping[str, Any], ctx: BuildContext) -> PgdAt:
        """From resolved ``params``; the start generator seeded from ``ctx.seed``."""
        return cls(_attack(params), bool(params["random_start"]), ctx.seed)

    def start(self, x: Tensor) -> Tensor:
        """Uniform in the L∞ ball (Madry et al.), or on the L2 sphere (the ``robustness`` library)."""
        if not self.random_start:
            return x
        eps = self.attack.eps
        if self.attack.norm is Norm.Linf:
            return x + eps * (2 * self._noise(x, gaussian=False) - 1)
        z = self._noise(x, gaussian=True)
        norms = z.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        return x + eps * z / norms.clamp_min(torch.finfo(z.dtype).tiny)

    def __call__(self, net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, at: StepInfo) -> StepLoss:
        """Cross-entropy on the PGD worst case of ``x [B,C,H,W]``, ``y [B]``."""
        with eval_mode(model):
            with torch.no_grad():
                clean = model(x).float()
            x_adv = self.attack.maximise(
                model, x, lambda z: F.cross_entropy(z, y, reduction="sum"), self.start(x)
            )
        _, logits_adv = net(x_adv)
        with full_precision(x):
            objective = F.cross_entropy(logits_adv.float(), y)
            ce = F.cross_entropy(clean, y)
        return StepLoss(objective, ce, clean, {})


@OBJECTIVES.register("trades")
class Trades(_Adversarial):
    """Zhang et al.'s TRADES: clean cross-entropy plus ``beta`` times the KL divergence between the
    clean and the adversarial predictions, the adversarial point maximising that KL (logged term:
    ``trades-kl``, already weighted by ``beta``)."""

    name = "trades"
    KEYS = (*_Adversarial.KEYS, "beta")
    REFERENCE = TRADES_REFERENCE

    def __init__(self, attack: InnerPgd, random_start: bool, seed: int, beta: float) -> None:
        super().__init__(attack, random_start, seed)
        self.beta = beta

    @classmethod
    def build(cls, params: Mapping[str, Any], ctx: BuildContext) -> Trades:
        """From resolved ``params``; the start generator seeded from ``ctx.seed``."""
        return cls(_attack(params), bool(params["random_start"]), ctx.seed, float(params["beta"]))

    def term_names(self) -> tuple[str, ...]:
        """The weighted KL term."""
        return ("trades-kl",)

    def start(self, x: Tensor) -> Tensor:
        """``x + 0.001 · N(0, I)`` (official code), or ``x`` without a random start."""
        return x + _TRADES_NOISE * self._noise(x, gaussian=True) if self.random_start else x

    def __call__(self, net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, at: StepInfo) -> StepLoss:
        """``CE(x) + beta · KL(p(x) || p(x'))`` of ``x [B,C,H,W]``, ``y [B]``."""
        with eval_mode(model):
            with torch.no_grad():
                target = F.log_softmax(model(x).float(), dim=1)
            x_adv = self.attack.maximise(model, x, lambda z: _kl(z, target, "sum"), self.start(x))
        _, both = net(torch.cat([x, x_adv]))  # one forward through the loop's module (DDP: one per step)
        with full_precision(x):
            logits, logits_adv = both.float().split(len(y))
            ce = F.cross_entropy(logits, y)
            kl = self.beta * _kl(logits_adv.float(), F.log_softmax(logits, dim=1), "batchmean")
        return StepLoss(ce + kl, ce, logits, {"trades-kl": kl})


def _kl(logits_adv: Tensor, log_p: Tensor, reduction: str) -> Tensor:
    """``KL(p || q)`` with ``log_p [B,K]`` the clean log-probabilities and ``q = softmax(logits_adv [B,K])``
    (the official ``KLDivLoss(log_softmax(adv), softmax(clean))``; with log-probabilities as the target,
    it is exactly 0 when the two logits agree)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), log_p, reduction=reduction, log_target=True)
