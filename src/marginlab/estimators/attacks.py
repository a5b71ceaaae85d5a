"""Upper bounds from minimum-norm attacks: DeepFool, DDN, FMN (foolbox 3.3.4) and FAB (pyautoattack).

The magnitude is the ``p``-norm of the smallest adversarial perturbation found, checked by running
the model on the returned point, so it can only overstate the distance to the boundary.

- Correctly classified points: the attack looks for a point classified as anything but ``y``.
- Misclassified points: the attack looks for a point classified as ``y`` — the distance *into*
  the region of ``y`` — by attacking the two-logit model ``[max_{k!=y} f_k, f_y]`` with label 0,
  so every attack handles it, also those without a targeted mode (one call for all such points of
  a batch; FAB, which calls the model on subsets of its batch, gets one call per label). The value
  is minus that norm.
- Points where the attack fails: ``+inf`` (``-inf`` for misclassified points).
Inputs must lie in [0, 1]; the attacks keep their points in [0, 1], so the distance found is an upper
bound of the margin over the box and, the box margin being the larger, of the margin over R^d: both
domains (``domain`` only labels the result).
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from marginlab.base.config import check_count, check_positive, require
from marginlab.base.errors import ConfigError
from marginlab.base.seed import check_seed
from marginlab.core.norms import Norm
from marginlab.estimators.base import Estimator, MarginKind, register

if TYPE_CHECKING:  # foolbox is slow to import: at run time only the attacks import it, lazily
    from foolbox.attacks.base import MinimizationAttack


class _TowardClass(nn.Module):
    """Two logits ``[max_{k != c} f_k, f_c]``: "label 0" means "not classified as c".

    ``c`` is one class for every input, or a tensor ``[n]`` of classes for batches of exactly ``n``.
    """

    def __init__(self, model: nn.Module, c: int | torch.Tensor) -> None:
        super().__init__()
        self.model, self.c = model, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        c = torch.as_tensor(self.c, device=x.device).expand(len(x))[:, None]
        others = logits.scatter(1, c, -math.inf).amax(dim=1)
        return torch.stack([others, logits.gather(1, c)[:, 0]], dim=1)


@dataclass(kw_only=True)
class MinNormAttack(Estimator):
    """Shared driver: run :meth:`_attack` on each group, verify, take norms, apply the sign rule."""

    kind = MarginKind.UPPER
    needs = frozenset({"grad"})
    # the point found lies in the box: its distance bounds the box margin, hence the R^d margin too
    domains = frozenset({"box", "rd"})
    calls_on_subsets: ClassVar[bool] = False  # True: the attack may call the model on part of a batch
    batch_size: int = 128

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        if float(x.min()) < 0 or float(x.max()) > 1:
            raise ConfigError(f"{self.name} needs inputs in [0, 1]")
        with torch.no_grad():
            correct = model(x).argmax(dim=1) == y
        dist = torch.full((len(x),), math.inf, device=x.device)
        if correct.any():
            dist[correct] = self._distances(model, x[correct], y[correct], p)
        wrong = ~correct
        groups = [wrong & (y == c) for c in y[wrong].unique().tolist()] if self.calls_on_subsets else [wrong]
        for group in groups:
            if group.any():
                c = y[group][0] if self.calls_on_subsets else y[group]
                toward = _TowardClass(model, c).eval()
                dist[group] = self._distances(toward, x[group], torch.zeros_like(y[group]), p)
        return torch.where(correct, dist, -dist)

    def _distances(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, p: float) -> torch.Tensor:
        """``[n]`` norms of ``adv - x`` where ``model(adv)`` no longer predicts ``labels``, else inf."""
        adv = self._attack(model, x, labels, p).detach()
        with torch.no_grad():
            fooled = model(adv).argmax(dim=1) != labels
        norms = torch.linalg.vector_norm((adv - x).flatten(1), ord=p, dim=1)
        return torch.where(fooled, norms, math.inf)

    def _attack(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, p: float) -> torch.Tensor:
        """Adversarial candidates ``[n,C,H,W]`` for points that ``model`` classifies as ``labels``."""
        raise NotImplementedError

    def _foolbox(
        self, attack: "MinimizationAttack", model: nn.Module, x: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        import foolbox as fb  # imported lazily: slow to import, and only the attacks need it

        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        adv, _, _ = attack(fmodel, x, labels, epsilons=None)
        return adv


def _check_factor(name: str, gamma: float) -> None:
    """DDN and FMN grow or shrink their radius by ``1 +- gamma``: only ``0 < gamma < 1`` makes sense."""
    ok = isinstance(gamma, int | float) and not isinstance(gamma, bool) and 0 < gamma < 1
    require(ok, f"{name} must lie strictly between 0 and 1, got {gamma!r}")


@register("deepfool")
@dataclass(kw_only=True)
class DeepFool(MinNormAttack):
    """foolbox L2/Linf DeepFool (logit loss); fast, a few % above the best attack."""

    steps: int = 50
    candidates: int = 10
    overshoot: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.param_name("steps"), self.steps)
        # foolbox compares the top class with at least one other (and raises below two)
        check_count(self.param_name("candidates"), self.candidates, minimum=2)
        check_positive(self.param_name("overshoot"), self.overshoot, allow_zero=True)

    def _attack(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, p: float) -> torch.Tensor:
        from foolbox.attacks import L2DeepFoolAttack, LinfDeepFoolAttack

        cls = L2DeepFoolAttack if p == 2 else LinfDeepFoolAttack
        attack = cls(steps=self.steps, candidates=self.candidates, overshoot=self.overshoot)
        return self._foolbox(attack, model, x, labels)


@register("ddn")
@dataclass(kw_only=True)
class DDN(MinNormAttack):
    """foolbox Decoupled Direction and Norm attack (L2 only)."""

    norms = frozenset({2.0})
    steps: int = 100
    init_epsilon: float = 1.0
    gamma: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.param_name("steps"), self.steps)
        check_positive(self.param_name("init_epsilon"), self.init_epsilon)
        _check_factor(self.param_name("gamma"), self.gamma)

    def _attack(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, p: float) -> torch.Tensor:
        from foolbox.attacks import DDNAttack

        attack = DDNAttack(init_epsilon=self.init_epsilon, steps=self.steps, gamma=self.gamma)
        return self._foolbox(attack, model, x, labels)


def _fixed_l2_fmn(*, steps: int, max_stepsize: float, gamma: float) -> "MinimizationAttack":
    """foolbox 3.3.4's L2 FMN with its projection repaired (inputs in [0, 1]).

    Its ``L2FMNAttack.project`` scales by ``min(1, norms / norms)`` (always 1), so the iterate is
    never pulled back onto the adaptive eps-ball and the attack returns roughly its first
    adversarial iterate (1.2-2.7x the true margin on linear models). Restoring the paper's
    ``delta * min(1, eps / ||delta||)`` alone is not enough: foolbox clips to the box *after*
    projecting, so on images with saturated pixels the ball's budget goes to components that the
    clip then removes and the attack stalls short of the boundary (95% failures on a digits MLP).
    Clipping first and then scaling towards x0 keeps the point in the box (convex, contains x0)
    and inside the ball.
    """
    import eagerpy as ep
    from foolbox.attacks import L2FMNAttack
    from foolbox.devutils import atleast_kd, flatten

    class FixedL2FMN(L2FMNAttack):
        def project(self, x: ep.Tensor, x0: ep.Tensor, epsilon: ep.Tensor) -> ep.Tensor:
            delta = ep.clip(x, 0.0, 1.0) - x0
            norms = ep.maximum(flatten(delta).norms.l2(axis=-1), 1e-12)
            return x0 + delta * atleast_kd(ep.minimum(1, epsilon / norms), x.ndim)

    return FixedL2FMN(steps=steps, max_stepsize=max_stepsize, gamma=gamma)


@register("fmn")
@dataclass(kw_only=True)
class FMN(MinNormAttack):
    """Fast Minimum-Norm attack (foolbox; L2 with the projection fix of :func:`_fixed_l2_fmn`)."""

    steps: int = 100
    max_stepsize: float | None = None  # None: 1.0 for L2, 0.1 for Linf
    gamma: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.param_name("steps"), self.steps)
        check_positive(self.param_name("max_stepsize"), self.max_stepsize)  # None passes
        _check_factor(self.param_name("gamma"), self.gamma)

    def _attack(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, p: float) -> torch.Tensor:
        from foolbox.attacks import LInfFMNAttack

        step = self.max_stepsize if self.max_stepsize is not None else (1.0 if p == 2 else 0.1)
        if p == 2:
            attack = _fixed_l2_fmn(steps=self.steps, max_stepsize=step, gamma=self.gamma)
        else:
            attack = LInfFMNAttack(steps=self.steps, max_stepsize=step, gamma=self.gamma)
        return self._foolbox(attack, model, x, labels)


@register("fab")
@dataclass(kw_only=True)
class FAB(MinNormAttack):
    """pyautoattack's untargeted FAB (L2/Linf); tightest of the four, and the slowest.

    FAB discards results with norm above ``eps``; the default ``eps`` is the diameter of the input
    box ([0,1]^D: sqrt(D) in L2, 1 in Linf), so nothing inside the box is discarded.
    """

    calls_on_subsets = True
    n_iter: int = 100
    n_restarts: int = 1
    eps: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.param_name("n_iter"), self.n_iter)
        check_count(self.param_name("n_restarts"), self.n_restarts)
        check_positive(self.param_name("eps"), self.eps)  # None passes
        check_seed(self.seed, self.param_name("seed"))

    def _attack(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, p: float) -> torch.Tensor:
        from pyautoattack.fab_pt import FABAttack_PT

        eps = self.eps if self.eps is not None else (math.sqrt(x[0].numel()) if p == 2 else 1.0)
        attack = FABAttack_PT(
            model,
            norm=str(Norm.parse(p)),  # "L2" or "Linf", pyautoattack's spelling too
            n_restarts=self.n_restarts,
            n_iter=self.n_iter,
            eps=eps,
            seed=self.seed,
            device=x.device,
        )
        # FAB reseeds torch's global RNG; fork it so callers (e.g. a training loop) are unaffected.
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return attack.perturb(x, labels)
