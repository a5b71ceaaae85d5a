"""Robust accuracy at a list of ε: the worst case over a cascade of attacks, each run only where needed.

For every ε (ascending) the *stages* run in order on the points still robust: ``bound`` (points whose
minimum-norm perturbation, a margin upper bound, is <= ε are broken without attacking), then the attacks
(``pgd`` then ``autoattack`` by default). A point broken at a smaller ε is broken at every larger one (its
adversarial example lies in the larger ball), so with ``chain_eps`` each ε starts from the previous ε's
survivors. ``robust_accuracy[stage][j]`` is the accuracy after ``stage`` at ``eps[j]``; the last stage is
the worst case. Adversarial examples are verified here (norm <= ε, inside [0, 1], misclassified).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from marginlab.errors import ConfigError
from marginlab.robustness import checks
from marginlab.robustness.attacks import ATTACKS, AttackSettings

__all__ = ["RobustnessResult", "robust_accuracy"]

log = logging.getLogger(__name__)


@dataclass
class RobustnessResult:
    """A robustness evaluation, JSON-able with ``marginlab.fsio.to_jsonable`` (or ``to_dict``).

    ``robust[j][i]``: point i survived every stage at ``eps[j]`` (worst case). ``attacked[stage][j]``: how
    many points the stage ran on. ``bound_share[j]``: share of points correct with margin bound > eps[j].
    """

    norm: str
    eps: list[float]
    stages: list[str]
    n: int
    clean_accuracy: float
    robust_accuracy: dict[str, list[float]]
    worst_case: list[float]
    bound_share: list[float] | None
    attacked: dict[str, list[int]]
    clean_correct: list[bool]
    robust: list[list[bool]]
    settings: dict[str, Any]
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    def accuracy(self, eps: float, stage: str = "worst") -> float:
        """Robust accuracy at ``eps`` after ``stage`` (``"worst"``: after the last stage)."""
        matches = [j for j, e in enumerate(self.eps) if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12)]
        if not matches:
            raise ConfigError(f"eps={eps:g} was not evaluated; evaluated: {self.eps}")
        return (self.worst_case if stage == "worst" else self.robust_accuracy[stage])[matches[0]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RobustnessResult:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _check_inputs(x: Tensor, y: Tensor, eps: Sequence[float], attacks: Sequence[str]) -> list[float]:
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ConfigError(
            f"need x [N, ...] and labels y [N] with N > 0, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not x.is_floating_point() or bool(x.min() < 0) or bool(x.max() > 1):
        raise ConfigError("inputs must be float tensors in [0, 1] (attacks clip to that box)")
    bad = [e for e in eps if not isinstance(e, int | float) or not math.isfinite(e) or e < 0]
    if bad or not eps:
        raise ConfigError(f"eps must be a non-empty list of finite numbers >= 0, got {list(eps)}")
    for name in attacks:
        ATTACKS.get(name)  # unknown names raise ConfigError listing the valid ones
    return sorted({float(e) for e in eps})


def _bounds(margin_upper: Any, n: int) -> Tensor | None:
    if margin_upper is None:
        return None
    b = torch.as_tensor(np.asarray(margin_upper, dtype=np.float64)).flatten()
    if len(b) != n:
        raise ConfigError(f"margin_upper has {len(b)} values for {n} points")
    return torch.where(torch.isnan(b), torch.inf, b)  # unknown bound: never counts as broken


def _verify(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, eps: float, s: AttackSettings) -> Tensor:
    """Which proposed x_adv [n, ...] are adversarial: in the ε-ball, in [0, 1], misclassified."""
    d = (x_adv - x).flatten(1)
    size = d.norm(dim=1) if s.norm == "L2" else d.abs().amax(dim=1)
    inside = (size <= eps * (1 + 1e-5) + 1e-7) & (x_adv.flatten(1).amin(1) >= -1e-6)
    inside &= x_adv.flatten(1).amax(1) <= 1 + 1e-6
    wrong = checks.predict(model, x_adv, s.batch_size).argmax(1) != y
    return inside & wrong


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Sequence[float],
    *,
    norm: str = "L2",
    attacks: Sequence[str] = ("pgd", "autoattack"),
    steps: int = 1000,
    step_size: float = 0.01,
    random_start: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    margin_upper: Any = None,
    skip_bound_broken: bool = True,
    chain_eps: bool = True,
    aa_version: str = "standard",
    aa_attacks: Sequence[str] | None = None,
    aa_iters: int | None = None,
    disagreement_tol: float = 0.02,
) -> RobustnessResult:
    """Robust accuracy of ``model`` (logits [N, K] from inputs [N, C, H, W] in [0, 1]) at each ε.

    ``margin_upper`` [N]: per-point norms of the smallest adversarial perturbations a minimum-norm attack
    found (NaN or inf: none found), in the same norm. With ``skip_bound_broken`` they break points without
    attacking (cheaper); without, they only feed the check that robust accuracy stays below their share.
    ``chain_eps=False`` evaluates each ε from scratch, so ``robust_accuracy["pgd"]`` is PGD's own figure.
    """
    aa_tuple = tuple(aa_attacks) if aa_attacks else None
    settings = AttackSettings(
        norm=norm,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
        batch_size=batch_size,
        seed=seed,
        aa_version=aa_version,
        aa_attacks=aa_tuple,
        aa_iters=aa_iters,
    )
    eps_list = _check_inputs(x, y, eps, attacks)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x.to(device), y.to(device)
    bounds = _bounds(margin_upper, len(x))
    warnings: list[str] = []
    was_training = model.training
    _warn(warnings, checks.check_train_mode(model))
    model.eval()
    try:
        logits = checks.predict(model, x, batch_size)
        _warn(warnings, checks.check_probability_outputs(logits))
        correct = logits.argmax(1) == y
        idx = correct.nonzero().flatten()[:batch_size]
        _warn(warnings, checks.check_zero_gradients(model, x[idx], y[idx]))
        stages = (["bound"] if bounds is not None and skip_bound_broken else []) + list(attacks)
        with checks.capture_warnings("auto-attack", warnings, prefix="autoattack: "):
            acc, attacked, seconds, rows = _cascade(
                model, x, y, correct, bounds, eps_list, stages, settings, chain_eps, warnings
            )
    finally:
        model.train(was_training)
    bound_share = None
    if bounds is not None:
        bound_share = [(correct.cpu() & (bounds > e)).float().mean().item() for e in eps_list]
        if bool((correct.cpu() & (bounds <= 0)).any()):
            _warn(
                warnings, "some correctly classified points have a margin upper bound <= 0; check the bounds"
            )
        for msg in checks.check_bound(stages, eps_list, acc, bound_share):
            _warn(warnings, msg)
    for msg in checks.check_attack_disagreement(stages, list(attacks), eps_list, acc, disagreement_tol):
        _warn(warnings, msg)
    return RobustnessResult(
        norm=settings.norm,
        eps=eps_list,
        stages=stages,
        n=len(x),
        clean_accuracy=correct.float().mean().item(),
        robust_accuracy=acc,
        worst_case=[r.float().mean().item() for r in rows],
        bound_share=bound_share,
        attacked=attacked,
        clean_correct=correct.cpu().tolist(),
        robust=[r.tolist() for r in rows],
        settings={
            **dataclasses.asdict(settings),
            "attacks": list(attacks),
            "chain_eps": chain_eps,
            "skip_bound_broken": skip_bound_broken,
            "disagreement_tol": disagreement_tol,
        },
        seconds=seconds,
        warnings=warnings,
    )


def _cascade(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    correct: Tensor,
    bounds: Tensor | None,
    eps_list: list[float],
    stages: list[str],
    settings: AttackSettings,
    chain_eps: bool,
    warnings: list[str],
) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, float], list[Tensor]]:
    """Run the stages per ε on the points still robust; returns accuracy and work per stage and ε, seconds
    per stage, and the worst-case robust flags [N] per ε."""
    acc: dict[str, list[float]] = {s: [] for s in stages}
    attacked: dict[str, list[int]] = {s: [] for s in stages}
    seconds = dict.fromkeys(stages, 0.0)
    rows: list[Tensor] = []
    robust = correct.clone()
    for e in eps_list:
        robust = (robust if chain_eps else correct).clone()
        for stage in stages:
            t0 = time.perf_counter()
            todo = robust.nonzero().flatten() if e > 0 else robust.new_zeros(0, dtype=torch.long)
            attacked[stage].append(len(todo))
            if len(todo) and stage == "bound":
                assert bounds is not None
                robust[todo[bounds.to(x.device)[todo] <= e]] = False
            elif len(todo):
                x_adv, notes = ATTACKS.get(stage)(model, x[todo], y[todo], e, settings)
                for note in notes:
                    _warn(warnings, note)
                robust[todo[_verify(model, x[todo], x_adv, y[todo], e, settings)]] = False
            seconds[stage] += time.perf_counter() - t0
            acc[stage].append(robust.float().mean().item())
        rows.append(robust.cpu())
    return acc, attacked, seconds, rows


def _warn(sink: list[str], msg: str | None) -> None:
    if msg and msg not in sink:
        log.warning(msg)
        sink.append(msg)
