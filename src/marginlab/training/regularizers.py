"""Loss terms added to the mean cross-entropy: Wu & Yu's average-margin regularizer and orthogonality penalty.

The training loop calls, per minibatch, ``loss = cross_entropy(logits, y).mean() + sum(r(model, features,
logits, y) for r in regularizers)``; every regularizer returns an already weighted scalar.

The poster's objective, per minibatch and divided by the batch size (the reference code takes
``torch.mean`` of the margin term, matching the mean cross-entropy)::

    mean_i CE_i  -  λ · mean_i [ min_{k≠y_i} (z_{y_i} - z_k) ]_0^γ  +  β · Σ_l ‖W_l W_lᵀ − I‖_F²

with z the logits (bias included, unnormalised: exactly what the reference computes) and the last sum
over every weight matrix, head included (the reference loops over every ``fc*``/``conv*`` weight).
Reference-code notes, kept here because they change numbers: for MNIST models the reference writes
the clipped term as a difference of convex hinges, max(0, γ − m) − max(0, −m), and linearises the second
once per epoch on the full training set (same objective, different minibatch gradient); for CIFAR models
it uses other terms (the hinge max(0, γ − m) for LR/MLP, clamp(−m, 0, γ) for the CNN); one version of its
``orthogonal_constraint`` adds each layer twice (a loop quirk on the bias parameters), i.e. an
effective β twice as large. We implement the formula as written.

Which terms each of the reference's recipes switches on, and their reference weights, live in
:mod:`marginlab.training.recipes`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from marginlab.base.deprecated import moved_attribute
from marginlab.base.errors import ConfigError
from marginlab.base.registry import Registry

# A term's mutable state for a checkpoint: plain Python values and tensors only (``weights_only``-safe).
RegularizerState = dict[str, Any]


class TermSettings(Protocol):
    """The weights a term is built from: a resolved :class:`marginlab.training.recipes.RegularizerConfig`
    (every weight its recipe uses set; see :func:`marginlab.training.recipes.resolve_config`)."""

    @property
    def lam(self) -> float | None:
        """Weight λ of the average-margin term."""

    @property
    def gamma(self) -> float | None:
        """Clipping level γ of the average-margin term."""

    @property
    def beta(self) -> float | None:
        """Weight β of the orthogonality penalty."""

    @property
    def normalized(self) -> bool:
        """Average margin divided by ‖w_y − w_k‖ (feature-space distance)."""

    @property
    def ortho_layers(self) -> str:
        """Which layers the orthogonality penalty covers."""

    @property
    def ortho_every(self) -> int:
        """Apply the penalty's gradient every k-th step."""

    @property
    def ortho_probes(self) -> int:
        """Gaussian probes of the penalty's estimate (0: exact)."""

    @property
    def seed(self) -> int:
        """Seed of the probes' own generator."""


class Regularizer(ABC):
    """A loss term; ``__call__`` returns a weighted scalar to be added to the mean cross-entropy.

    A term with mutable state (a step counter, its own RNG) overrides :meth:`state_dict` and
    :meth:`load_state_dict`; the training checkpoint saves and restores every term through them.
    """

    name: str = ""

    @abstractmethod
    def __call__(self, model: nn.Module, features: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        """``features`` [B, F] = Φ(x), ``logits`` [B, K] = head(Φ(x)), ``y`` [B] int64 -> scalar tensor."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: TermSettings) -> Regularizer:
        """Build from a resolved config (every weight set)."""

    def state_dict(self) -> RegularizerState:
        """Internal state to checkpoint (step counters, RNG states) so a resumed run continues exactly;
        stateless terms return ``{}``."""
        return {}

    def load_state_dict(self, state: RegularizerState) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None


REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")


def logit_margins(logits: Tensor, y: Tensor, head_weight: Tensor | None = None) -> Tensor:
    """Feature-space margins ``min_{k≠y} (z_y − z_k)`` [B] from logits [B, K] and labels [B].

    With ``head_weight`` [K, F] each gap is divided by ‖w_y − w_k‖₂ (the distance in feature space to
    the pairwise boundary when z = W Φ + b).
    """
    gaps = logits.gather(1, y[:, None]) - logits  # [B, K]
    if head_weight is not None:
        sq = head_weight.pow(2).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * head_weight @ head_weight.T  # [K, K] squared distances
        # clamp before sqrt: the diagonal is ~0 and would give an infinite gradient (it is masked below)
        gaps = gaps / d2.clamp_min(1e-12).sqrt()[y]
    gaps = gaps.masked_fill(F.one_hot(y, logits.shape[1]).bool(), math.inf)
    return gaps.min(dim=1).values


@REGULARIZERS.register("average-margin")
class AverageMargin(Regularizer):
    """``-λ · mean_i clip(m_i, 0, γ)``: rewards margins up to γ; zero gradient outside [0, γ]."""

    name = "average-margin"

    def __init__(self, lam: float, gamma: float, normalized: bool = False) -> None:
        if not (math.isfinite(lam) and lam >= 0 and math.isfinite(gamma) and gamma > 0):
            raise ConfigError(f"average-margin needs lam >= 0 and gamma > 0, got lam={lam}, gamma={gamma}")
        self.lam, self.gamma, self.normalized = float(lam), float(gamma), normalized

    @classmethod
    def from_config(cls, cfg: TermSettings) -> AverageMargin:
        """λ, γ and ``normalized`` of a resolved config."""
        assert cfg.lam is not None and cfg.gamma is not None, "resolve_config first"
        return cls(cfg.lam, cfg.gamma, cfg.normalized)

    def __call__(self, model: nn.Module, features: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        weight = None
        if self.normalized:
            head = getattr(model, "head", None)
            if not isinstance(head, nn.Linear):
                raise ConfigError("normalized average-margin needs a model with a linear `head`")
            weight = head.weight
        margins = logit_margins(logits, y, weight)
        return -self.lam * margins.clamp(0.0, self.gamma).mean()


class _GramPenalty(torch.autograd.Function):
    """‖G − I‖_F² for the smaller Gram matrix G of W [m, n], with the gradient in closed form.

    ∇_W ‖W Wᵀ − I‖² = 4 (W Wᵀ − I) W (wide W) or 4 W (Wᵀ W − I) (tall W): one more matrix product on top
    of the Gram, where autograd's backward through ``w @ w.T`` takes two (one per operand).
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        wide = w.shape[0] <= w.shape[1]
        gram = w @ w.T if wide else w.T @ w
        gram.diagonal().sub_(1.0)  # in place: G − I without a second [k, k] buffer
        ctx.save_for_backward(w, gram)
        ctx.wide = wide
        return gram.pow(2).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        w, a = ctx.saved_tensors
        return (4.0 * grad) * (a @ w if ctx.wide else w @ a)


def orthogonality_penalty(
    weight: Tensor, probes: int = 0, generator: torch.Generator | None = None
) -> Tensor:
    """‖W Wᵀ − I‖_F² for W [m, ...] reshaped to [m, n], through the smaller Gram matrix.

    For m > n, tr((WWᵀ)²) = tr((WᵀW)²) and tr(WWᵀ) = tr(WᵀW), so ‖WWᵀ − I_m‖² = ‖WᵀW − I_n‖² + (m − n).
    The exact value (``probes = 0``) has its gradient 4 (WWᵀ − I) W in closed form (2 products of cost
    m·n·min(m, n), where autograd takes 3). With ``probes = p > 0``: the unbiased estimate
    mean_j ‖(G − I) v_j‖² + (m − n), v_j ~ N(0, I), which costs 2·m·n·p instead of m·n·min(m, n) (its
    gradient is unbiased too).
    """
    w = weight.flatten(1)
    m, n = w.shape
    wide = m <= n  # Gram over the smaller side: W Wᵀ [m, m] if wide, else Wᵀ W [n, n]
    k, extra = (m, 0) if wide else (n, m - n)
    if probes == 0:
        return _GramPenalty.apply(w) + extra
    v = torch.randn(k, probes, generator=generator, dtype=w.dtype, device=w.device)
    av = (w @ (w.T @ v) if wide else w.T @ (w @ v)) - v
    return av.pow(2).sum() / probes + extra


def _ortho_weights(model: nn.Module, layers: str) -> list[Tensor]:
    mods = dict(model.named_modules())
    if layers in ("all", "hidden"):
        head = getattr(model, "head", None) if layers == "hidden" else None
        return [
            m.weight
            for m in mods.values()
            if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) and m is not head
        ]
    weighted = [n for n, m in mods.items() if isinstance(getattr(m, "weight", None), Tensor)]
    names = [s.strip() for s in layers.split(",") if s.strip()]
    bad = [s for s in names if s not in weighted]
    if bad or not names:
        raise ConfigError(
            f"ortho_layers {layers!r}: no weighted layer {bad[0] if bad else ''!r}; "
            f"use 'all', 'hidden' or names from: {', '.join(weighted)}"
        )
    return [mods[s].weight for s in names]


@REGULARIZERS.register("orthogonality")
class Orthogonality(Regularizer):
    """``β · Σ_l ‖W_l W_lᵀ − I‖_F²`` over the chosen layers (conv kernels as out × in·k·k)."""

    name = "orthogonality"

    def __init__(
        self, beta: float, layers: str = "all", every: int = 1, probes: int = 0, seed: int = 0
    ) -> None:
        if not (math.isfinite(beta) and beta >= 0) or every < 1 or probes < 0:
            raise ConfigError(
                f"orthogonality needs beta >= 0, every >= 1, probes >= 0; got {beta}, {every}, {probes}"
            )
        self.beta, self.layers, self.every, self.probes, self.seed = float(beta), layers, every, probes, seed
        self.step = 0  # calls so far; with every > 1 the penalty is applied on calls 0, k, 2k, ...
        self._last: Tensor | None = None  # β · penalty at the last applied call: the value between them
        self._generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def from_config(cls, cfg: TermSettings) -> Orthogonality:
        """β and the ``ortho_*`` settings (layers, every, probes) and seed of a resolved config."""
        assert cfg.beta is not None, "resolve_config first"
        return cls(cfg.beta, cfg.ortho_layers, cfg.ortho_every, cfg.ortho_probes, cfg.seed)

    def penalty(self, model: nn.Module) -> Tensor:
        """The unweighted Σ_l ‖W_l W_lᵀ − I‖_F² (exact, or the probe estimate)."""
        weights = _ortho_weights(model, self.layers)
        if not weights:
            return torch.zeros(())
        return sum(
            (orthogonality_penalty(w, self.probes, self._generator(w.device)) for w in weights),
            torch.zeros((), device=weights[0].device),
        )

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The probes' generator on ``device`` (None for the exact penalty, which draws nothing)."""
        return None if self.probes == 0 else self._stream(device)

    def _stream(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:  # own stream: probes never disturb the data-order RNG
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def state_dict(self) -> RegularizerState:
        """The call counter, the last applied value and the probes' generator states (per device)."""
        last = None if self._last is None else float(self._last)
        rng = {str(d): g.get_state() for d, g in self._generators.items()}
        return {"step": self.step, "rng": rng, "last": last}

    def load_state_dict(self, state: RegularizerState) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.step = int(state["step"])
        last = state.get("last")
        self._last = None if last is None else torch.tensor(last, dtype=torch.float64)
        for device, rng in state.get("rng", {}).items():
            self._stream(torch.device(device)).set_state(rng)  # saved only where probes drew from it

    def __call__(self, model: nn.Module, features: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        step, self.step = self.step, self.step + 1
        if step % self.every:
            # no gradient; the value is the last computed one, so that the logged term stays β·penalty
            return logits.new_zeros(()) if self._last is None else self._last.to(logits)
        value = self.beta * self.penalty(model)
        self._last = value.detach()
        if self.every == 1:
            return value
        # gradient scaled by `every` so that the average gradient over k steps is the exact one; value as is
        return self._last + self.every * (value - self._last)


def __getattr__(name: str) -> Any:
    """The recipes and reference values moved to :mod:`marginlab.training.recipes` (deprecated aliases)."""
    return moved_attribute(__name__, name)
