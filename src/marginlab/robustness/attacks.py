"""Fixed-ε attacks, by name: L2/L∞ PGD with random start (foolbox) and AutoAttack (pyautoattack).

An attack only *proposes* adversarial inputs ``x_adv`` [n, C, H, W] for a batch of clean-correct points;
the evaluator verifies each one (inside the ε-ball and [0, 1], misclassified) before counting it, so a
library quirk can never make a model look less robust than it is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from marginlab.base.config import check_count, check_positive
from marginlab.base.errors import ConfigError
from marginlab.base.registry import Registry
from marginlab.base.seed import check_seed
from marginlab.core.norms import Norm
from marginlab.estimators import ESTIMATORS, MarginKind
from marginlab.estimators.base import validate_params
from marginlab.estimators.presets import prepass_bound

__all__ = ["ATTACKS", "NORMS", "RobustnessSettings", "autoattack", "normalize_norm", "pgd"]

NORMS = (Norm.L2, Norm.Linf)  # the norms robustness is evaluated in ("L2", "Linf")
AA_VERSIONS = ("standard", "plus", "custom")
AUTO_CERTIFIER = "crown"  # certify="auto": CROWN where bound propagation supports the model's layers
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


_NORM_ERROR = f"unknown norm {{value!r}}; choose from: {', '.join(NORMS)}"


def normalize_norm(norm: str) -> str:
    """Deprecated: use ``Norm.parse(norm, NORMS)`` (:class:`marginlab.core.norms.Norm`).

    ``"l2"``/``"L2"``/``"2"`` -> ``"L2"``; ``"linf"``/``"inf"`` -> ``"Linf"``; else ConfigError.
    """
    warnings.warn(
        "marginlab.robustness.normalize_norm is deprecated; use marginlab.core.norms.Norm.parse",
        DeprecationWarning,
        stacklevel=2,
    )
    return Norm.parse(norm, NORMS, error=_NORM_ERROR)


@dataclass(frozen=True)
class RobustnessSettings:
    """Every setting of a robustness evaluation, one object for the CLI, configs and the Python API.

    ``attacks``: the fixed-ε attacks, in order (each runs on the points still robust); by default AutoAttack
    alone: its APGD-CE is PGD on the same loss with an adaptive step; on a trained MNIST-CNN, adding the
    reference PGD (1000 steps) before it left robust accuracy unchanged and cost more CPU than APGD-CE +
    APGD-T (benchmarks/bench_eval_speed.py). ``("pgd", "autoattack")`` adds the reference's attack, and a
    warning when it alone would overstate robustness. ``bound``: the
    minimum-norm estimator of the pre-pass (``None``: none; ``"auto"``: DDN for L2, FMN for L∞, which
    DDN does not support) with ``bound_params``. PGD: ``steps`` of
    absolute size ``step_size`` (the reference: L2, 1000 steps of 0.01), cross-entropy loss, random start.
    AutoAttack: ``aa_version`` ('standard' is the trustworthy default; 'custom' runs ``aa_attacks`` only,
    with ``aa_iters`` iterations if given), at the radii ``aa_eps`` (``None``: all). ``tol``: how much a
    later attack may break beyond the earlier ones (a share of all points) before a warning says the
    earlier attacks alone overstate robustness. ``certify``: the certified lower bound of the certificate
    pre-pass (:mod:`marginlab.robustness.certify`), with ``certify_params``: ``"auto"`` (CROWN over the R^d
    ball where bound propagation supports the model's layers, with interval bounds on the hidden layers
    of convolutional nets, else none, with a note), ``"off"`` (none), or the name of a
    lower-bound or exact estimator (``crown``, ``lipschitz``...; errors are not caught).
    """

    norm: Norm = Norm.L2  # given in any spelling Norm.parse accepts ("2", "l2", inf, ...)
    attacks: tuple[str, ...] = ("autoattack",)
    bound: str | None = "auto"
    bound_params: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    step_size: float = 0.01
    random_start: bool = True
    batch_size: int = 256
    seed: int = 0
    aa_version: str = "standard"
    aa_attacks: tuple[str, ...] | None = None
    aa_iters: int | None = None
    aa_eps: tuple[float, ...] | None = None
    tol: float = 0.02
    certify: str | None = "auto"
    certify_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm.parse(self.norm, NORMS, error=_NORM_ERROR))
        attacks = (self.attacks,) if isinstance(self.attacks, str) else tuple(dict.fromkeys(self.attacks))
        object.__setattr__(self, "attacks", attacks)
        if not attacks:
            raise ConfigError("name at least one attack (pgd, autoattack)")
        for name in attacks:
            ATTACKS.get(name)  # unknown names: one line listing the valid ones
        self._check_bound()
        self._check_certify()
        if self.aa_eps is not None:
            object.__setattr__(self, "aa_eps", tuple(float(e) for e in self.aa_eps))
            if "autoattack" not in attacks:  # the radii of an attack that never runs: surely a mistake
                raise ConfigError(
                    f"AutoAttack radii (aa_eps) given, but autoattack is not among the attacks "
                    f"({', '.join(attacks)})"
                )
        if not (math.isfinite(self.tol) and 0 <= self.tol <= 1):
            raise ConfigError(f"tol must be a share in [0, 1], got {self.tol!r}")
        check_count("attack steps", self.steps)
        check_positive("attack step_size", self.step_size)  # also rejects nan and inf
        check_count("attack batch_size", self.batch_size)
        check_seed(self.seed, "attack seed")
        if self.aa_version not in AA_VERSIONS:
            raise ConfigError(f"unknown AutoAttack version {self.aa_version!r}; choose from: {AA_VERSIONS}")
        if (self.aa_version == "custom") != bool(self.aa_attacks):
            raise ConfigError("AutoAttack attacks can be chosen (and must be) only with version 'custom'")
        bad = [a for a in self.aa_attacks or () if a not in AA_ATTACKS]
        if bad:
            raise ConfigError(f"unknown AutoAttack attack {bad[0]!r}; choose from: {', '.join(AA_ATTACKS)}")
        if self.aa_iters is not None:
            check_count("aa_iters", self.aa_iters)

    def check_radii(self, eps: Sequence[float]) -> None:
        """Refuse ``aa_eps`` radii that are not among the radii ``eps`` evaluated: AutoAttack runs only
        at evaluated radii, so such a radius would silently never be attacked (one line naming it)."""
        if self.aa_eps is None:
            return
        missing = [w for w in self.aa_eps if not any(math.isclose(w, e) for e in eps)]
        if missing:
            shown = ", ".join(f"{e:g}" for e in eps)
            raise ConfigError(
                f"AutoAttack radius (aa_eps) {missing[0]:g} is not among the radii evaluated (eps "
                f"{shown}): AutoAttack runs only at those; give it among the eps too"
            )

    def _check_bound(self) -> None:
        if isinstance(self.bound, str) and self.bound.lower() == "none":
            object.__setattr__(self, "bound", None)
        if self.bound == "auto":
            object.__setattr__(self, "bound", prepass_bound(self.norm))
        if self.bound is None:
            return

        est = ESTIMATORS.get(self.bound)
        if est.kind is not MarginKind.UPPER:
            raise ConfigError(
                f"bound {self.bound!r} is not a minimum-norm attack; use ddn, deepfool, fmn, fab or best"
            )
        if self.norm.p not in est.norms:
            raise ConfigError(f"bound {self.bound!r} does not support the {self.norm} norm")
        validate_params(self.bound, dict(self.bound_params), "bound_params")

    def _check_certify(self) -> None:
        name = self.certify
        if name is None or (isinstance(name, str) and name.lower() in ("off", "none")):
            object.__setattr__(self, "certify", "off")
            name = "off"
        if not isinstance(name, str):
            raise ConfigError(f"certify must be auto, off or an estimator name, got {name!r}")
        if name == "off":
            if self.certify_params:
                raise ConfigError("certify_params need a certifier; certify is off")
            return
        est = ESTIMATORS.get(AUTO_CERTIFIER if name == "auto" else name)
        if est.kind not in (MarginKind.LOWER, MarginKind.EXACT):
            raise ConfigError(
                f"certify {name!r} is not a certified lower bound; use auto, crown, lipschitz or off"
            )
        if self.norm.p not in est.norms:
            raise ConfigError(f"certify {name!r} does not support the {self.norm} norm")
        validate_params(est.name, dict(self.certify_params), "certify_params")


def parse_eps(value: str | float | Sequence[float]) -> list[float]:
    """Radii from ``"0.5,1,2"``, one number or a list -> sorted distinct floats; NaN, inf, negatives,
    booleans and junk are one-line errors. The one parser of radii (CLI, configs and Python)."""
    items = (
        value.split(",")
        if isinstance(value, str)
        else [value]
        if isinstance(value, int | float)
        else list(value)
    )
    out: list[float] = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            number = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"eps must be numbers like 0.5,1,2, got {str(item).strip()!r}") from None
        if not math.isfinite(number) or number < 0:
            raise ConfigError(f"eps must be finite and >= 0, got {str(item).strip()!r}")
        out.append(number)
    if not out:
        raise ConfigError("give at least one eps value, e.g. --eps 0.5,1,2")
    return sorted(set(out))


# An attack: (model, x [n, ...] clean-correct, y [n], eps, settings) -> (x_adv [n, ...], notes).
AttackFn = Callable[[nn.Module, Tensor, Tensor, float, "RobustnessSettings"], tuple[Tensor, list[str]]]
ATTACKS: Registry[AttackFn] = Registry("attack")


@ATTACKS.register("pgd")
def pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, s: RobustnessSettings
) -> tuple[Tensor, list[str]]:
    """Projected gradient ascent on the cross-entropy loss from a random start in the ε-ball (foolbox)."""
    import foolbox as fb

    cls = fb.attacks.L2PGD if s.norm == "L2" else fb.attacks.LinfPGD
    attack = cls(abs_stepsize=s.step_size, steps=s.steps, random_start=s.random_start)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    out = []
    # foolbox draws its random start from torch's global RNG: seed a forked copy, leave the caller's alone
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(s.seed)
        for xb, yb in zip(x.split(s.batch_size), y.split(s.batch_size), strict=True):
            _, clipped, _ = attack(fmodel, xb, yb, epsilons=eps)
            out.append(clipped.detach())
    return torch.cat(out), []


@ATTACKS.register("autoattack")
def autoattack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, s: RobustnessSettings
) -> tuple[Tensor, list[str]]:
    """AutoAttack (Croce & Hein 2020) at radius ``eps``; runs its attacks one after the other on the
    points still robust, as the official code does."""
    from pyautoattack import AutoAttack

    kwargs: dict = {
        "norm": s.norm,
        "eps": float(eps),
        "version": s.aa_version,
        "seed": s.seed,
        "device": x.device,
    }
    if s.aa_version == "custom":
        kwargs["attacks"] = list(s.aa_attacks or ())
    aa = AutoAttack(model, **kwargs)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    notes = _fit_to_problem(aa, num_classes, square_ok=s.norm != "L2" or x.shape[-2] >= 5)
    if s.aa_iters is not None:
        for att in (aa.apgd, aa.apgd_targeted, aa.fab):
            att.n_iter = s.aa_iters
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=s.batch_size)
    return x_adv.detach(), notes


class _TargetedAttack(Protocol):
    """What :func:`_fit_to_problem` sets on AutoAttack's targeted attacks (``apgd_targeted``, ``fab``)."""

    n_target_classes: int


class _AutoAttackPlan(Protocol):
    """The parts of a ``pyautoattack.AutoAttack`` (untyped library) that :func:`_fit_to_problem` adjusts."""

    apgd_targeted: _TargetedAttack
    fab: _TargetedAttack
    attacks_to_run: list[str]


def _fit_to_problem(aa: _AutoAttackPlan, num_classes: int, square_ok: bool = True) -> list[str]:
    """Targeted attacks use up to 9 target classes; fewer classes need fewer targets, and DLR losses need
    at least 3 (untargeted) or 4 (targeted) classes. L2 Square needs images at least 5 pixels high."""
    targets = min(9, num_classes - 1)
    aa.apgd_targeted.n_target_classes = targets
    aa.fab.n_target_classes = targets
    dlr = f"the DLR loss needs more than {num_classes} classes"
    reasons = {"apgd-t": dlr if num_classes <= 3 else None, "apgd-dlr": dlr if num_classes < 3 else None}
    reasons["square"] = None if square_ok else "L2 Square needs images at least 5 pixels high"
    planned: list[str] = list(aa.attacks_to_run)
    aa.attacks_to_run = [a for a in planned if not reasons.get(a)]
    return [f"AutoAttack: {a} skipped, {reasons[a]}" for a in planned if reasons.get(a)]
