"""MMA training (Ding et al. 2020, "MMA Training: Direct Input Space Margin Maximization through
Adversarial Training"), as the official code (BorealisAI ``mma_training``: ``trainer.py``, ``anpgd.py``,
``config.py``) does it; docs/training-methods.md (``## mma``) lists the reference values and deviations.

Per step: the clean batch's cross-entropy ``ce``; for each point the clean model classifies correctly
(soft logit margin < 0), AN-PGD finds its closest boundary point: PGD at the point's previous radius
ε₀ maximising the soft logit margin, then a bisection of the radius along the PGD direction in
[0, 1.05 dmax]. The MMA loss is the cross-entropy at the found point for correct points whose radius is
below ``dmax`` (the hinge: points farther than dmax are left alone) and at the clean point for wrong
ones, summed and divided by the batch size. The step minimises ``c ce + (1 - c) mma`` with c = 1/3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
    ObjectiveState,
    StepInfo,
    StepLoss,
    dataset_family,
    full_precision,
)

Margin = Callable[[Tensor, Tensor], Tensor]

# Reference values (config.py, run_*_training.sh of the official code) per dataset family and norm:
# dmax (``hinge_maxeps``), the smallest starting radius (``attack_mineps``), PGD steps (``nb_iter``).
_REFERENCE: dict[tuple[str, Norm], dict[str, float]] = {
    ("mnist", Norm.Linf): {"dmax": 0.45, "min_eps": 0.1, "steps": 40},
    ("mnist", Norm.L2): {"dmax": 4.0, "min_eps": 0.5, "steps": 40},
    ("cifar", Norm.Linf): {"dmax": 32 / 255, "min_eps": 0.005, "steps": 10},
    ("cifar", Norm.L2): {"dmax": 2.0, "min_eps": 0.5, "steps": 10},
}
_DEFAULTS: dict[str, Any] = {
    "norm": "Linf",
    "clean_weight": 1 / 3,
    "search_steps": 10,
    "step_scale": 2.5,
    "search_loss": "slm",
}
_KEYS = ("norm", "dmax", "min_eps", "steps", "search_steps", "step_scale", "clean_weight", "search_loss")
_MAX_FACTOR = 1.05  # the search's ceiling over dmax (train.py: attack_maxeps = 1.05 hinge_maxeps)


def soft_logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """``logsumexp_{k != y} f_k - f_y`` [B] of ``logits [B,K]`` (advertorch's SoftLogitMarginLoss):
    negative only where ``y`` wins, by a log(K-1) safety gap at most."""
    others = logits.scatter(1, y[:, None], -math.inf)
    return torch.logsumexp(others, dim=1) - logits.gather(1, y[:, None]).squeeze(1)


def logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{k != y} f_k - f_y`` [B] of ``logits [B,K]``: negative exactly where ``y`` wins."""
    others = logits.scatter(1, y[:, None], -math.inf)
    return others.max(dim=1).values - logits.gather(1, y[:, None]).squeeze(1)


SEARCH_LOSSES: dict[str, Margin] = {"slm": soft_logit_margin, "lm": logit_margin}


def _per_point(v: Tensor, like: Tensor) -> Tensor:
    """``v [B]`` shaped to broadcast against ``like [B, ...]``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _clip_norm(delta: Tensor, eps: Tensor, norm: Norm) -> Tensor:
    """``delta [B,...]`` projected onto the per-point balls of radius ``eps [B]``."""
    if norm is Norm.Linf:
        e = _per_point(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e)
    size = torch.linalg.vector_norm(delta.flatten(1), dim=1)
    return delta * _per_point(torch.clamp(eps / size.clamp_min(1e-12), max=1.0), delta)


def _random_start(x: Tensor, eps: Tensor, norm: Norm, gen: torch.Generator) -> Tensor:
    """advertorch's ``rand_init_delta``: uniform in the L∞ ball, or a uniform point of the box moved into
    the L2 ball; then kept in the box. Drawn on the CPU from ``gen`` (device-independent, resumable)."""
    u = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    delta = (2 * u - 1) * _per_point(eps, x) if norm is Norm.Linf else _clip_norm(u - x, eps, norm)
    return (x + delta).clamp(0, 1) - x


@dataclass(frozen=True)
class AnPgd:
    """AN-PGD (anpgd.py): PGD at a point's starting radius, then a bisection of the radius along the
    PGD direction in [0, ``max_eps``]. ``margin``: the loss PGD maximises and the bisection tests
    (``< 0``: still classified as y); ``step_scale``: PGD's step is ``step_scale eps / steps``."""

    norm: Norm
    max_eps: float
    steps: int
    search_steps: int = 10
    step_scale: float = 2.5
    margin: Margin = soft_logit_margin

    def pgd(self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, gen: torch.Generator) -> Tensor:
        """``x' [B,...]`` maximising ``margin(model(x'), y)`` in the balls of radii ``eps [B]`` and [0, 1]
        (sign steps in L∞, normalised gradient steps in L2; advertorch's ``perturb_iterative``)."""
        step = _per_point(self.step_scale * eps / self.steps, x)
        delta = _random_start(x, eps, self.norm, gen)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(self.margin(model(x + delta).float(), y).sum(), delta)
            if self.norm is Norm.Linf:
                direction = grad.sign()
            else:
                direction = grad / _per_point(
                    torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-12), grad
                )
            delta = delta.detach() + step * direction
            if self.norm is Norm.Linf:  # advertorch's order: ball then box in L∞, box then ball in L2
                delta = (x + _clip_norm(delta, eps, self.norm)).clamp(0, 1) - x
            else:
                delta = _clip_norm((x + delta).clamp(0, 1) - x, eps, self.norm)
        return (x + delta.detach()).clamp(0, 1)

    @torch.no_grad()
    def bisect(self, model: nn.Module, x: Tensor, y: Tensor, unit: Tensor, eps0: Tensor) -> Tensor:
        """The radius ``t [B]`` where ``margin(model(clip(x + t unit)), y)`` turns >= 0 along
        ``unit [B,...]``: ``search_steps`` bisections of [0, max_eps] from ``eps0 [B]``
        (``bisection_search``). Points still correct at ``max_eps`` end just below it."""
        lo, hi, t = torch.zeros_like(eps0), torch.full_like(eps0, self.max_eps), eps0
        m = self.margin(model((x + _per_point(t, x) * unit).clamp(0, 1)).float(), y)
        for i in range(self.search_steps):
            inside = m < 0  # still classified as y at radius t
            lo = torch.where(inside, torch.maximum(lo, t), lo)
            hi = torch.where(inside, hi, torch.minimum(hi, t))
            t = (lo + hi) / 2
            if i + 1 < self.search_steps:  # the official code also tests the last midpoint, unused
                m = self.margin(model((x + _per_point(t, x) * unit).clamp(0, 1)).float(), y)
        return t

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, eps0: Tensor, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """The closest boundary point ``x* [B,...]`` (in [0, 1]) and its radius ``eps [B]`` for correctly
        classified ``x``, ``y``, from radii ``eps0 [B]`` (``<= max_eps``). ``model`` should be in eval
        mode; no parameter gradient is touched."""
        x_adv = self.pgd(model, x, y, eps0, gen)
        unit = (x_adv - x) / _per_point(eps0 + 1e-12, x)
        eps = self.bisect(model, x, y, unit, eps0)
        return (x + _per_point(eps, x) * unit).clamp(0, 1), eps


def _reference(dataset: str | None, norm: Norm) -> dict[str, float] | None:
    family = dataset_family(dataset)
    return None if family is None else _REFERENCE[(family, norm)]


def _positive(params: dict[str, Any], key: str, *, integer: bool = False) -> None:
    value = params[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
    if not ok or (integer and value != int(value)):
        raise ConfigError(f"mma {key} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    params[key] = int(value) if integer else float(value)


@OBJECTIVES.register("mma")
class MMA(Objective):
    """Max-margin adversarial training: ``c ce + (1 - c) mma`` (see the module docstring).

    Each point's radius from its last visit is the next search's start (official: ``dct_eps``) when the
    loop passes the batch's dataset indices as ``at.index`` (a tensor ``[B]``); without them every search
    starts at the mean radius the previous step found, at least ``min_eps``. Both are checkpointed.
    """

    name = "mma"

    def __init__(self, params: Mapping[str, Any], seed: int = 0) -> None:
        self.dmax, self.min_eps = float(params["dmax"]), float(params["min_eps"])
        self.clean_weight = float(params["clean_weight"])
        self.margin = SEARCH_LOSSES[str(params["search_loss"])]
        self.attack = AnPgd(
            Norm.parse(params["norm"]), _MAX_FACTOR * self.dmax, int(params["steps"]),
            int(params["search_steps"]), float(params["step_scale"]), self.margin,
        )  # fmt: skip
        self.gen = torch.Generator().manual_seed(seed + 0x4D4D41)  # "MMA": apart from the data order
        self.point_eps = torch.empty(0)  # per dataset index; NaN: not visited yet
        self.last_eps = self.min_eps  # mean radius of the previous step (the start without indices)
        self.mean_eps = 0.0  # mean radius of the last step's correct points, for logs and tests

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], ctx: BuildContext) -> dict[str, Any]:
        """Fill ``norm``, ``dmax``, ``min_eps``, ``steps`` (per dataset and norm), ``search_steps``,
        ``step_scale``, ``clean_weight``, ``search_loss`` with the official values; check them."""
        unknown = [k for k in params if k not in _KEYS]
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r} of recipe 'mma'; known: {', '.join(_KEYS)}")
        out = {**_DEFAULTS, **params}
        norm = Norm.parse(
            out["norm"], (Norm.L2, Norm.Linf), error="mma norm must be L2 or Linf, got {value!r}"
        )
        out["norm"] = str(norm)
        ref = _reference(ctx.dataset, norm)
        missing = [k for k in ("dmax", "min_eps", "steps") if k not in out and ref is None]
        if missing:
            raise ConfigError(
                f"recipe 'mma' has no reference parameters for dataset {ctx.dataset!r}; "
                f"set {', '.join(missing)} in [regularizer.params]"
            )
        for key in ("dmax", "min_eps", "steps"):
            out.setdefault(key, ref[key] if ref else None)
        for key in ("dmax", "min_eps", "step_scale"):
            _positive(out, key)
        for key in ("steps", "search_steps"):
            _positive(out, key, integer=True)
        c = out["clean_weight"]
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c <= 1:
            raise ConfigError(f"mma clean_weight must be in [0, 1], got {c!r}")
        out["clean_weight"] = float(c)
        if out["search_loss"] not in SEARCH_LOSSES:
            raise ConfigError(
                f"mma search_loss must be one of {sorted(SEARCH_LOSSES)}, got {out['search_loss']!r}"
            )
        return out

    @classmethod
    def build(cls, params: Mapping[str, Any], ctx: BuildContext) -> MMA:
        """The MMA objective for resolved ``params``, its generator seeded from ``ctx.seed``."""
        return cls(params, ctx.seed)

    def term_names(self) -> tuple[str, ...]:
        """``("mma",)``: the weighted MMA loss ``(1 - c) mma``."""
        return ("mma",)

    def _start(self, index: Tensor | None, n: int, device: torch.device) -> Tensor:
        """Starting radii [n] of the searches: each point's last radius, else the previous step's mean."""
        start = torch.full((n,), max(self.last_eps, self.min_eps))
        if index is not None and len(self.point_eps) > 0:
            idx = index.cpu()
            seen = idx < len(self.point_eps)
            prev = self.point_eps[idx.clamp(max=len(self.point_eps) - 1)]
            start = torch.where(seen & ~prev.isnan(), prev.clamp(min=self.min_eps), start)
        return start.clamp(max=_MAX_FACTOR * self.dmax).to(device)

    def _remember(self, index: Tensor | None, eps: Tensor) -> None:
        """Store the radii ``eps [n]`` found (by dataset index when given) and their mean."""
        if len(eps) == 0:
            return
        self.last_eps = self.mean_eps = float(eps.mean())
        if index is not None:
            idx = index.cpu()
            need = int(idx.max()) + 1
            if need > len(self.point_eps):
                grown = torch.full((need,), math.nan)
                grown[: len(self.point_eps)] = self.point_eps
                self.point_eps = grown
            self.point_eps[idx] = eps.detach().float().cpu()

    def search(self, model: nn.Module, x: Tensor, y: Tensor, eps0: Tensor) -> tuple[Tensor, Tensor]:
        """AN-PGD with this objective's settings on ``model`` in eval mode (its mode restored after):
        boundary points ``[B,...]`` and radii ``[B]`` of the correctly classified ``x``, ``y``."""
        was_training = model.training
        model.eval()  # as advertorch's ctx_noparamgrad_and_eval: no dropout or batch statistics in the search
        try:
            return self.attack(model, x, y, eps0, self.gen)
        finally:
            model.train(was_training)

    def __call__(self, net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, at: StepInfo) -> StepLoss:
        """``c ce + (1 - c) mma`` of the batch ``x [B,C,H,W]``, ``y [B]``."""
        with torch.no_grad(), full_precision(x):  # which points are correct (the official clean forward)
            correct = self.margin(model(x).float(), y) < 0
        index = at.index  # dataset indices [B], when the loop gives them
        eps = torch.zeros(len(y), device=x.device)
        x_mma = x.detach().clone()
        if bool(correct.any()):
            sub = None if index is None else index[correct.to(index.device)]
            start = self._start(sub, int(correct.sum()), x.device)
            x_mma[correct], eps[correct] = self.search(model, x[correct].detach(), y[correct], start)
            self._remember(sub, eps[correct])
        _, both = net(torch.cat([x, x_mma]))  # one forward through the loop's module (DDP: one per step)
        with full_precision(x):
            logits, logits_mma = both.float().split(len(y))
            ce = F.cross_entropy(logits, y)
            per_point = F.cross_entropy(logits_mma, y, reduction="none")
            keep = ~correct | (eps < self.dmax)  # the hinge: correct points beyond dmax add nothing
            term = (1 - self.clean_weight) * (per_point * keep).sum() / len(y)
        return StepLoss(self.clean_weight * ce + term, ce, logits, {"mma": term})

    def state_dict(self) -> ObjectiveState:
        """The search's generator, the per-point radii and the previous step's mean radius."""
        return {"gen": self.gen.get_state(), "point_eps": self.point_eps.clone(), "last_eps": self.last_eps}

    def load_state_dict(self, state: ObjectiveState) -> None:
        """Restore what :meth:`state_dict` returned."""
        if "gen" in state:
            self.gen.set_state(state["gen"])
        self.point_eps = state.get("point_eps", torch.empty(0)).clone()
        self.last_eps = float(state.get("last_eps", self.min_eps))
