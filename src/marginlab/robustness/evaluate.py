"""The one robustness evaluator: per ε a band, certified accuracy <= robust accuracy <= clean accuracy.

Used by ``marginlab robustness``, the ``compare`` experiment and the Python API alike, with the same
honest defaults (:class:`RobustnessSettings`)::

    res = robust_accuracy(model, x, y, [0.5, 1.0])     # certificates, bound pre-pass, then AutoAttack
    res.certified, res.worst_case, res.band(0.5), res.accuracy["autoattack"], res.warnings
    res.save("robustness.json"); RobustnessResult.load("robustness.json")

The stages, for every ε in ascending order, on the points still undecided (:mod:`.cascade`):

0. certificates (``settings.certify``, CROWN in the box domain by default, :mod:`.certify`): one
   certified lower bound of every point's margin, for all ε at once. A correctly classified point whose
   certified radius is >= ε is robust at ε for sure: it counts in ``certified[j]``, the lower end of
   the band, and no stage runs on it there. (The two pre-passes are computed bound first, so that the
   points the bound breaks at every ε, and the misclassified ones, are not certified at all: their
   radius is 0. The figures do not depend on the order.)
1. ``bound``: one minimum-norm attack (``settings.bound``, DDN for L2) gives every point an upper
   bound on its margin, for all ε at once; a point whose bound is <= ε is broken without attacking.
   The share of points whose bound exceeds ε is itself an upper bound on robust accuracy.
2. the fixed-ε attacks (``autoattack`` by default; ``pgd`` first on request), each only on the points
   that no certificate, bound or earlier attack decided: only these can change the figures.

A point broken at ε stays broken at every larger ε (its adversarial example lies in the larger ball), so
each ε starts from the previous one's survivors. ``accuracy[stage][j]`` is the accuracy after ``stage`` at
``eps[j]``; ``worst_case`` is after the last stage, the reported figure (the upper end of the band).
Adversarial examples are verified here (norm <= ε, inside [0, 1], misclassified), so a library quirk never
makes a model look less robust, and checked against the certificates: an adversarial example or a
min-norm bound inside a certified ball, or a band out of order, raises
:class:`~marginlab.robustness.certify.SoundnessError` (a bug, never hidden). Sanity checks end up in
``warnings``: train mode, zero input gradients, and a later attack breaking more than ``tol`` of the
points an earlier one left robust (that one alone would overstate robustness). Robust accuracy can never
exceed the bound's share, by construction: bound-broken points are never attacked. Models that output
probabilities are refused (:mod:`marginlab.base.inputs`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import atomic_write_json, read_json, to_jsonable
from marginlab.base.inputs import ArrayInput, check_model_outputs, check_train_mode, prepare_inputs
from marginlab.core.predict import predict_logits
from marginlab.robustness import checks
from marginlab.robustness.attacks import RobustnessSettings, parse_eps
from marginlab.robustness.cascade import run_cascade, upper_bounds
from marginlab.robustness.certify import certify, check_band, check_bounds, worth_certifying

__all__ = ["RobustnessResult", "RobustnessSettings", "margin_upper_from_points", "robust_accuracy"]

log = logging.getLogger(__name__)


class RobustnessPoints(TypedDict):
    """Per point of a :class:`RobustnessResult` (N points, in the order given): its ``label``, whether the
    model classifies it ``correct``ly, its margin upper bound ``margin_upper`` (``None`` without a bound;
    an entry is ``None`` in JSON where no adversarial example was found), the worst-case ``robust`` flags
    ``[len(eps)][N]``, its ``index`` in the split when the caller gave it, and its signed certified radius
    ``margin_lower`` (a lower bound of the margin; ``None`` without certificates, and absent from files
    written before certificates; an entry is ``None`` in JSON where the whole box is certified)."""

    label: list[int]
    correct: list[bool]
    margin_upper: list[float | None] | None
    robust: list[list[bool]]
    index: NotRequired[list[int]]
    margin_lower: NotRequired[list[float | None] | None]


@dataclass
class RobustnessResult:
    """A robustness evaluation; ``to_dict``/``from_dict`` and ``save``/``load`` round-trip it through JSON.

    ``accuracy[stage][j]``: accuracy after ``stage`` at ``eps[j]`` (``stages``: ``bound`` when a bound
    was used, then the attacks). ``attacked[stage][j]``: how many points the stage ran on.
    ``bound_share[j]``: share of points correct with margin bound > eps[j] (an upper bound on robust
    accuracy). ``points``: per point its ``label``, ``correct``, ``margin_upper`` (the bound; JSON null =
    none found) and the worst-case ``robust`` flags ``[len(eps)][N]``; ``index`` its position in the split
    when the caller gives it; ``margin_lower`` its certified radius.

    The band: ``certified[j]`` (share of points correct with certified radius >= eps[j]; ``None`` without
    certificates) <= ``worst_case[j]`` <= ``clean_accuracy``. ``certifier``: what certified (``estimator``,
    ``kind``, ``domain``, ``params``; ``None`` without). ``decided[how][j]``: how many correctly
    classified points were ``certified``, broken by the ``bound``, broken by an attack at a smaller ε
    (``earlier``), or ``attacked`` (left to the fixed-ε attacks) at eps[j]. ``notes``: one-line remarks
    that are not warnings (e.g. why there are no certificates). Files written before certificates lack
    these four fields and load with their defaults.
    """

    norm: str
    eps: list[float]
    stages: list[str]
    n: int
    clean_accuracy: float
    accuracy: dict[str, list[float | None]]
    worst_case: list[float]
    bound: dict[str, str] | None
    bound_share: list[float] | None
    attacked: dict[str, list[int]]
    points: RobustnessPoints
    settings: dict[str, Any]
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    certified: list[float] | None = None
    certifier: dict[str, Any] | None = None
    decided: dict[str, list[int]] | None = None
    notes: list[str] = field(default_factory=list)

    def at(self, eps: float, stage: str = "worst") -> float:
        """Robust accuracy at ``eps`` after ``stage`` (``"worst"``: after the last stage; ``"certified"``:
        the certified accuracy)."""
        j = self._index(eps)
        if stage == "certified":
            if self.certified is None:
                raise ConfigError("this evaluation has no certificates")
            return self.certified[j]
        value = (self.worst_case if stage == "worst" else self.accuracy[stage])[j]
        if value is None:
            raise ConfigError(f"{stage} did not run at eps={eps:g}")
        return value

    def band(self, eps: float) -> tuple[float | None, float]:
        """``(certified, robust)`` accuracy at ``eps``: the true robust accuracy lies between them
        (``certified`` is ``None`` without certificates)."""
        j = self._index(eps)
        return (None if self.certified is None else self.certified[j]), self.worst_case[j]

    def _index(self, eps: float) -> int:
        matches = [j for j, e in enumerate(self.eps) if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12)]
        if not matches:
            raise ConfigError(f"eps={eps:g} was not evaluated; evaluated: {self.eps}")
        return matches[0]

    def margin_upper(self) -> np.ndarray | None:
        """The per-point bounds ``[N]`` with the infinities JSON could not hold restored: no adversarial
        found is ``+inf`` for a correctly classified point and ``-inf`` for a misclassified one."""
        return margin_upper_from_points(self.points)

    def margin_lower(self) -> np.ndarray | None:
        """The per-point certified radii ``[N]`` (signed lower bounds of the margin), infinities restored
        (``+inf``: the whole box certified); ``None`` without certificates."""
        return _restore_infinities(self.points, self.points.get("margin_lower"))

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON values (non-finite numbers as ``None``), keys in field order."""
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RobustnessResult:
        """The result that :meth:`to_dict` gave (extra keys are ignored).

        Raises :class:`RunDirError` when a field is missing."""
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        optional = {f.name for f in fields if f.default is not dataclasses.MISSING}
        optional |= {f.name for f in fields if f.default_factory is not dataclasses.MISSING}
        missing = [n for n in names if n not in d and n not in optional]
        if missing:
            raise RunDirError(f"not a robustness result: {missing[0]!r} is missing")
        return cls(**{n: d[n] for n in names if n in d})

    def save(self, path: str | Path, **extra: object) -> None:
        """Write the result (plus ``extra`` keys, e.g. what model was loaded) atomically as JSON."""
        atomic_write_json(path, {**extra, **self.to_dict()})

    @classmethod
    def load(cls, path: str | Path) -> RobustnessResult:
        """Read a saved result; an unreadable or foreign file raises :class:`RunDirError` naming it."""
        try:
            raw = read_json(path)
        except (OSError, ValueError) as e:
            raise RunDirError(f"{path} is unreadable ({type(e).__name__})") from None
        if not isinstance(raw, dict):
            raise RunDirError(f"{path} is not a robustness result")
        try:
            return cls.from_dict(raw)
        except RunDirError as e:
            raise RunDirError(f"{path}: {e}") from None


def margin_upper_from_points(points: RobustnessPoints) -> np.ndarray | None:
    """:meth:`RobustnessResult.margin_upper` on the ``points`` of a saved result."""
    return _restore_infinities(points, points.get("margin_upper"))


def _restore_infinities(points: RobustnessPoints, raw: list[float | None] | None) -> np.ndarray | None:
    """Per-point values ``[N]`` with JSON's ``None`` as ``+inf`` (correct) or ``-inf`` (misclassified)."""
    if raw is None:
        return None
    correct = np.asarray(points["correct"], dtype=bool)
    values = np.array([np.nan if v is None else v for v in raw], dtype=np.float64)
    return np.where(np.isnan(values), np.where(correct, np.inf, -np.inf), values)


def robust_accuracy(
    model: nn.Module,
    x: ArrayInput,
    y: ArrayInput,
    eps: float | Sequence[float],
    settings: RobustnessSettings | None = None,
    *,
    margin_upper: ArrayInput | None = None,
    index: Sequence[int] | Tensor | np.ndarray | None = None,
    **overrides: Any,
) -> RobustnessResult:
    """Certified and robust accuracy of ``model`` (inputs ``x [N, C, H, W]`` in [0, 1] → logits [N, K])
    at each ε: the band ``certified <= worst_case <= clean_accuracy``.

    ``settings`` (default :class:`RobustnessSettings`: CROWN certificates where the model allows them,
    DDN bound pre-pass, AutoAttack 'standard' on the undecided points), or its fields as keyword
    ``overrides`` (``attacks=("pgd",)``, ``certify="off"``...). ``margin_upper [N]``: bounds computed
    elsewhere (skips the pre-pass). ``x``/``y`` may be numpy arrays; ``eps`` a number.
    """
    if settings is None:
        s = RobustnessSettings(**overrides)
    else:
        s = dataclasses.replace(settings, **overrides) if overrides else settings
    eps_list = parse_eps(eps)
    s.check_radii(eps_list)  # an aa_eps outside eps would silently never be attacked
    x, y = prepare_inputs(x, y)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x.to(device), y.to(device)
    warnings: list[str] = []
    _warn(warnings, check_train_mode(model))
    was_training = model.training
    model.eval()
    try:
        logits = predict_logits(model, x, s.batch_size)
        check_model_outputs(logits, y)
        correct = logits.argmax(1) == y
        idx = correct.nonzero().flatten()[: s.batch_size]
        _warn(warnings, checks.check_zero_gradients(model, x[idx], y[idx]))
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        bounds = upper_bounds(model, x, y, s, margin_upper)
        if s.bound is not None or margin_upper is not None:
            seconds["bound"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        certs = certify(model, x, y, s, worth_certifying(correct, bounds, eps_list[0]))
        if certs.info is not None:
            seconds["certify"] = time.perf_counter() - t0
        _warn(warnings, check_bounds(correct, certs.radii, bounds, own=margin_upper is None))
        stages = (["bound"] if bounds is not None else []) + list(s.attacks)
        with checks.capture_warnings("auto-attack", warnings, prefix="autoattack: "):
            out = run_cascade(
                model, x, y, correct, bounds, certs.radii, eps_list, stages, s, lambda m: _warn(warnings, m)
            )
    finally:
        model.train(was_training)
    seconds.update({k: v for k, v in out.seconds.items() if k != "bound"})
    share = None
    if bounds is not None:
        share = [float((correct.cpu() & (bounds > e)).double().mean()) for e in eps_list]
        if bool((correct.cpu() & (bounds <= 0)).any()):
            _warn(
                warnings, "some correctly classified points have a margin upper bound <= 0; check the bounds"
            )
    for msg in checks.check_attack_disagreement(stages, list(s.attacks), eps_list, out.accuracy, s.tol):
        _warn(warnings, msg)
    worst = [float(r.double().mean()) for r in out.rows]
    clean = float(correct.double().mean())
    check_band(out.certified, worst, clean, eps_list)
    if certs.note:
        log.info(certs.note)
    points: RobustnessPoints = {
        "label": y.cpu().tolist(),
        "correct": correct.cpu().tolist(),
        "margin_upper": None if bounds is None else bounds.tolist(),
        "robust": [r.tolist() for r in out.rows],
        "margin_lower": None if certs.radii is None else certs.radii.tolist(),
    }
    if index is not None:
        points["index"] = [int(i) for i in index]
    return RobustnessResult(
        norm=s.norm,
        eps=eps_list,
        stages=stages,
        n=len(y),
        clean_accuracy=clean,
        accuracy=out.accuracy,
        worst_case=worst,
        bound=None if bounds is None else {"estimator": s.bound or "given", "kind": "upper bound"},
        bound_share=share,
        attacked=out.attacked,
        points=points,
        settings=dataclasses.asdict(s),
        seconds=seconds,
        warnings=warnings,
        certified=out.certified,
        certifier=certs.info,
        decided=out.decided,
        notes=[certs.note] if certs.note else [],
    )


def _warn(sink: list[str], msg: str | None) -> None:
    if msg and msg not in sink:
        log.warning(msg)
        sink.append(msg)
