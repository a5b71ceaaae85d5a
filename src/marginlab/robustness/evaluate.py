"""The one robustness evaluator: robust accuracy at a list of ε, the worst case of a cascade of stages.

Used by ``marginlab robustness``, the ``compare`` experiment and the Python API alike, with the same
honest defaults (:class:`RobustnessSettings`)::

    res = robust_accuracy(model, x, y, [0.5, 1.0])              # bound pre-pass, then AutoAttack
    res.worst_case, res.accuracy["autoattack"], res.warnings
    res.save("robustness.json"); RobustnessResult.load("robustness.json")

The stages, for every ε in ascending order, on the points still robust:

1. ``bound``: one minimum-norm attack (``settings.bound``, DDN for L2) gives every point an upper
   bound on its margin, for all ε at once; a point whose bound is <= ε is broken without attacking.
   The share of points whose bound exceeds ε is itself an upper bound on robust accuracy.
2. the fixed-ε attacks (``autoattack`` by default; ``pgd`` first on request), each only on the points
   that neither the bound nor an earlier attack broke: an attack that fails where the bound already
   succeeded would add cost and nothing else.

A point broken at ε stays broken at every larger ε (its adversarial example lies in the larger ball), so
each ε starts from the previous one's survivors. ``accuracy[stage][j]`` is the accuracy after ``stage`` at
``eps[j]``; ``worst_case`` is after the last stage, the reported figure. Adversarial examples are verified
here (norm <= ε, inside [0, 1], misclassified), so a library quirk never makes a model look less robust.
Sanity checks end up in ``warnings``: train mode, zero input gradients, and a later attack breaking more
than ``tol`` of the points an earlier one left robust (that one alone would overstate robustness). Robust
accuracy can never exceed the bound's share, by construction: bound-broken points are never attacked.
Models that output probabilities are refused (:mod:`marginlab.base.inputs`).
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
from marginlab.core.predict import predict_labels, predict_logits
from marginlab.estimators import estimate_margins
from marginlab.robustness import checks
from marginlab.robustness.attacks import ATTACKS, RobustnessSettings, parse_eps

__all__ = ["RobustnessResult", "RobustnessSettings", "robust_accuracy"]

log = logging.getLogger(__name__)


class RobustnessPoints(TypedDict):
    """Per point of a :class:`RobustnessResult` (N points, in the order given): its ``label``, whether the
    model classifies it ``correct``ly, its margin upper bound ``margin_upper`` (``None`` without a bound;
    an entry is ``None`` in JSON where no adversarial example was found), the worst-case ``robust`` flags
    ``[len(eps)][N]``, and its ``index`` in the split when the caller gave it."""

    label: list[int]
    correct: list[bool]
    margin_upper: list[float | None] | None
    robust: list[list[bool]]
    index: NotRequired[list[int]]


@dataclass
class RobustnessResult:
    """A robustness evaluation; ``to_dict``/``from_dict`` and ``save``/``load`` round-trip it through JSON.

    ``accuracy[stage][j]``: accuracy after ``stage`` at ``eps[j]`` (``stages``: ``bound`` when a bound
    was used, then the attacks). ``attacked[stage][j]``: how many points the stage ran on.
    ``bound_share[j]``: share of points correct with margin bound > eps[j] (an upper bound on robust
    accuracy). ``points``: per point its ``label``, ``correct``, ``margin_upper`` (the bound; JSON null =
    none found) and the worst-case ``robust`` flags ``[len(eps)][N]``; ``index`` its position in the split
    when the caller gives it.
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

    def at(self, eps: float, stage: str = "worst") -> float:
        """Robust accuracy at ``eps`` after ``stage`` (``"worst"``: after the last stage)."""
        matches = [j for j, e in enumerate(self.eps) if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12)]
        if not matches:
            raise ConfigError(f"eps={eps:g} was not evaluated; evaluated: {self.eps}")
        value = (self.worst_case if stage == "worst" else self.accuracy[stage])[matches[0]]
        if value is None:
            raise ConfigError(f"{stage} did not run at eps={eps:g}")
        return value

    def margin_upper(self) -> np.ndarray | None:
        """The per-point bounds ``[N]`` with the infinities JSON could not hold restored: no adversarial
        found is ``+inf`` for a correctly classified point and ``-inf`` for a misclassified one."""
        return margin_upper_from_points(self.points)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON values (non-finite numbers as ``None``), keys in field order."""
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RobustnessResult:
        """The result that :meth:`to_dict` gave (extra keys are ignored).

        Raises :class:`RunDirError` when a field is missing."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d and n != "warnings"]
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
    raw = points.get("margin_upper")
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
    """Robust accuracy of ``model`` (inputs ``x [N, C, H, W]`` in [0, 1] → logits [N, K]) at each ε.

    ``settings`` (default :class:`RobustnessSettings`: DDN bound pre-pass, AutoAttack 'standard'),
    or its fields as keyword ``overrides`` (``attacks=("pgd",)``, ``steps=50``...). ``margin_upper [N]``:
    bounds computed elsewhere (skips the pre-pass). ``x``/``y`` may be numpy arrays; ``eps`` a number.
    """
    if settings is None:
        s = RobustnessSettings(**overrides)
    else:
        s = dataclasses.replace(settings, **overrides) if overrides else settings
    eps_list = parse_eps(eps)
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
        bounds = _bounds(model, x, y, s, margin_upper)
        if s.bound is not None or margin_upper is not None:
            seconds["bound"] = time.perf_counter() - t0
        stages = (["bound"] if bounds is not None else []) + list(s.attacks)
        with checks.capture_warnings("auto-attack", warnings, prefix="autoattack: "):
            acc, attacked, times, rows = _cascade(model, x, y, correct, bounds, eps_list, stages, s, warnings)
    finally:
        model.train(was_training)
    seconds.update({k: v for k, v in times.items() if k != "bound"})
    share = None
    if bounds is not None:
        share = [float((correct.cpu() & (bounds > e)).double().mean()) for e in eps_list]
        if bool((correct.cpu() & (bounds <= 0)).any()):
            _warn(
                warnings, "some correctly classified points have a margin upper bound <= 0; check the bounds"
            )
    for msg in checks.check_attack_disagreement(stages, list(s.attacks), eps_list, acc, s.tol):
        _warn(warnings, msg)
    points: RobustnessPoints = {
        "label": y.cpu().tolist(),
        "correct": correct.cpu().tolist(),
        "margin_upper": None if bounds is None else bounds.tolist(),
        "robust": [r.tolist() for r in rows],
    }
    if index is not None:
        points["index"] = [int(i) for i in index]
    return RobustnessResult(
        norm=s.norm,
        eps=eps_list,
        stages=stages,
        n=len(y),
        clean_accuracy=float(correct.double().mean()),
        accuracy=acc,
        worst_case=[float(r.double().mean()) for r in rows],
        bound=None if bounds is None else {"estimator": s.bound or "given", "kind": "upper bound"},
        bound_share=share,
        attacked=attacked,
        points=points,
        settings=dataclasses.asdict(s),
        seconds=seconds,
        warnings=warnings,
    )


def _bounds(
    model: nn.Module, x: Tensor, y: Tensor, s: RobustnessSettings, given: ArrayInput | None
) -> Tensor | None:
    """Per-point margin upper bounds [N] (float64, CPU): ``given``, else the pre-pass, else ``None``."""
    if given is not None:
        b = torch.as_tensor(np.asarray(given, dtype=np.float64)).flatten()
        if len(b) != len(y):
            raise ConfigError(f"margin_upper has {len(b)} values for {len(y)} points")
        return torch.where(torch.isnan(b), torch.inf, b)  # unknown bound: never counts as broken
    if s.bound is None:
        return None

    params = {s.bound: dict(s.bound_params)} if s.bound_params else None
    res = estimate_margins(model, x, y, [s.bound], p=s.norm, batch_size=s.batch_size, params=params)
    return res[s.bound].values


def _verify(
    model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, eps: float, s: RobustnessSettings
) -> Tensor:
    """Which proposed x_adv [n, ...] are adversarial: in the ε-ball, in [0, 1], misclassified."""
    d = (x_adv - x).flatten(1)
    size = d.norm(dim=1) if s.norm == "L2" else d.abs().amax(dim=1)
    inside = (size <= eps * (1 + 1e-5) + 1e-7) & (x_adv.flatten(1).amin(1) >= -1e-6)
    inside &= x_adv.flatten(1).amax(1) <= 1 + 1e-6
    wrong = predict_labels(model, x_adv, s.batch_size) != y
    return inside & wrong


def _cascade(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    correct: Tensor,
    bounds: Tensor | None,
    eps_list: list[float],
    stages: list[str],
    s: RobustnessSettings,
    warnings: list[str],
) -> tuple[dict[str, list[float | None]], dict[str, list[int]], dict[str, float], list[Tensor]]:
    """Run the stages per ε on the points still robust; returns accuracy and work per stage and ε (``None``
    where a stage did not run), seconds per stage, and the worst-case robust flags [N] per ε."""
    acc: dict[str, list[float | None]] = {st: [] for st in stages}
    attacked: dict[str, list[int]] = {st: [] for st in stages}
    seconds = dict.fromkeys(stages, 0.0)
    rows: list[Tensor] = []
    robust = correct.clone()
    aa_eps = None if s.aa_eps is None else list(s.aa_eps)
    for e in eps_list:
        robust = robust.clone()
        for stage in stages:
            t0 = time.perf_counter()
            todo = robust.nonzero().flatten() if e > 0 else robust.new_zeros(0, dtype=torch.long)
            if stage == "autoattack" and aa_eps is not None and not any(math.isclose(e, w) for w in aa_eps):
                attacked[stage].append(0)  # AutoAttack only at the radii asked for (it is the costly stage)
                acc[stage].append(None)
                continue
            attacked[stage].append(len(todo))
            if len(todo) and stage == "bound":
                assert bounds is not None
                robust[todo[bounds.to(x.device)[todo] <= e]] = False
            elif len(todo):
                x_adv, notes = ATTACKS.get(stage)(model, x[todo], y[todo], e, s)
                for note in notes:
                    _warn(warnings, note)
                robust[todo[_verify(model, x[todo], x_adv, y[todo], e, s)]] = False
            seconds[stage] += time.perf_counter() - t0
            acc[stage].append(float(robust.double().mean()))
        rows.append(robust.cpu())
    return acc, attacked, seconds, rows


def _warn(sink: list[str], msg: str | None) -> None:
    if msg and msg not in sink:
        log.warning(msg)
        sink.append(msg)
