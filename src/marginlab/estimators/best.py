"""``best``: the per-point tightest upper bound over several attacks, and :func:`estimate_margins`."""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.base.inputs import check_model_outputs, check_train_mode, prepare_inputs
from marginlab.bounds.domain import parse_domain
from marginlab.core.norms import Norm
from marginlab.core.predict import predict_logits
from marginlab.estimators.base import (
    ESTIMATORS,
    NORM_ERROR,
    NORMS,
    Estimator,
    MarginKind,
    build_estimator,
    evaluating,
    model_device,
    register,
    validate_params,
)
from marginlab.estimators.presets import best_attacks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarginResult:
    """One estimator's margins of a set of points, with what kind of number they are and where.

    ``values [N]``: signed margins (float64, CPU; the sign rule of :mod:`marginlab.estimators.base`).
    ``kind``: exact / lower bound / upper bound / estimate, as achieved by this call
    (:meth:`Estimator.result_kind`). ``params``: the estimator's settings as used (every default resolved;
    plain values only, never per-point data). ``seconds``: wall time of the work this result added (for
    ``best``: the attacks it ran itself, once; an attack that has its own result costs it nothing).
    ``p``: the norm's order. ``domain``: ``"box"`` ([0,1]^d) or ``"rd"`` (R^d), the domain the margins
    are distances in (:meth:`Estimator.result_domain`). ``columns``: extra per-point columns
    ``{name: [N] values}`` (:meth:`Estimator.point_columns`, e.g. a solver's ``status``); ``arrays``:
    large per-point arrays ``{name: [N, ...]}`` (:meth:`Estimator.point_arrays`, e.g. perturbations).
    """

    estimator: str
    kind: MarginKind
    values: torch.Tensor
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    p: float = 2.0
    domain: str = "box"
    columns: dict[str, list[object]] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)

    def numpy(self) -> np.ndarray:
        """The signed margins as a float64 numpy array ``[N]`` (sharing memory with ``values``)."""
        return self.values.numpy()


def combine_upper_bounds(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per point, the value of smallest magnitude: ``[N]`` from A tensors ``[N]`` that share signs.

    Every upper-bound estimator gives the same sign (the prediction decides it), so the smallest
    magnitude is the tightest bound for correctly and for misclassified points alike.
    """
    stacked = torch.stack(list(values))
    pick = stacked.abs().argmin(dim=0, keepdim=True)
    return stacked.gather(0, pick)[0]


def _is_attack(name: str) -> bool:
    return name != "best" and ESTIMATORS.get(name).kind is MarginKind.UPPER


@register("best")
@dataclass(kw_only=True)
class Best(Estimator):
    """Per-point minimum over ``attacks`` of the perturbation norm found (default: DDN and FMN for L2,
    FMN and DeepFool for L∞, where DDN has no mode)."""

    kind = MarginKind.UPPER
    needs = frozenset({"grad"})
    domains = frozenset({"box", "rd"})  # attacks: upper bounds of the box margin, hence of the R^d one
    attacks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attacks is None:
            return
        self.attacks = tuple(self.attacks)
        bad = [a for a in self.attacks if not _is_attack(a)]
        if not self.attacks or bad:
            raise ConfigError(f"best combines attacks (upper bounds) only; not: {', '.join(bad) or '(none)'}")

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        attacks = self.attacks or best_attacks(p)
        values = [
            build_estimator(a, batch_size=len(x), domain=self.domain)(model, x, y, p=p) for a in attacks
        ]
        return combine_upper_bounds(values)


def with_domain(
    names: Sequence[str],
    params: dict[str, dict[str, Any]],
    domain: str | None,
    *,
    where_honoured: bool = False,
) -> dict[str, dict[str, Any]]:
    """``params`` with ``domain`` set for every estimator in ``names`` that has no ``domain`` of its own
    there (an explicit parameter wins). ``where_honoured``: only for estimators whose ``domains`` include
    it (the others keep their own default silently; ``marginlab margins`` without ``--domain``).
    ``domain=None``: ``params`` unchanged."""
    out = {name: dict(kw) for name, kw in params.items()}
    if domain is None:
        return out
    domain = parse_domain(domain)
    for name in names:
        if where_honoured and domain not in ESTIMATORS.get(name).domains:
            continue
        out.setdefault(name, {}).setdefault("domain", domain)
    return out


def estimate_margins(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: Sequence[str],
    *,
    p: Norm | float | str = 2,
    batch_size: int | None = None,
    params: dict[str, dict[str, object]] | None = None,
    device: str | torch.device | None = None,
    domain: str | None = None,
) -> dict[str, MarginResult]:
    """Margins ``{name: MarginResult}`` of ``x [N,C,H,W]``, ``y [N]`` for each estimator named; each result
    holds the signed margins ``values [N]`` (float64 CPU), the kind achieved, the domain, its parameters,
    its time and the estimator's per-point extras (``columns``, ``arrays``).

    ``x``/``y`` may be numpy arrays (``[N, H, W]`` grey images gain their channel axis); a model that
    outputs probabilities or non-finite logits on any point is refused (margins are defined on finite
    logits) and one in train mode is evaluated
    in eval mode with a warning (:mod:`marginlab.base.inputs`, the same checks as ``robust_accuracy``).
    ``params`` maps an estimator name to its keyword parameters; ``batch_size`` overrides every
    estimator's batch size; ``device`` moves the model there first (else it stays where it is).
    ``domain`` (``"box"`` or ``"rd"``; ``None``: each estimator's default) is every estimator's domain
    unless ``params`` gives it one; an estimator that cannot honour it says so (see
    :mod:`marginlab.estimators.base`).
    ``"best"`` reuses the attacks computed for the other names (its own ``attacks`` parameter, or
    DDN and FMN, when no attack is named); its ``seconds`` count only the attacks it ran itself.
    """
    params = params or {}
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ConfigError(f"params given for {unknown[0]!r}, which is not among the estimators {list(names)}")
    for name in names:
        ESTIMATORS.get(name)  # fail on a typo before any long computation
    params = with_domain(names, {n: dict(kw) for n, kw in params.items()}, domain)
    params = {name: validate_params(name, kw) for name, kw in params.items()}  # and on a bad value
    order = Norm.parse(p, NORMS, error=NORM_ERROR).p  # 2.0 or inf, what the estimators get
    if device is not None:
        model.to(device)
    x, y = prepare_inputs(x, y)
    warning = check_train_mode(model)
    if warning:
        log.warning(warning)
    with evaluating(model):
        # every point, not a sample: a model with NaN logits on one point would give it margin +inf
        logits = predict_logits(model, x, batch_size or 256, device=model_device(model))
        check_model_outputs(logits, y)
    results: dict[str, MarginResult] = {}

    def run(name: str) -> MarginResult:
        if name not in results:
            kw = dict(params.get(name, {}))
            if batch_size is not None:
                kw["batch_size"] = batch_size
            if domain is not None:  # an attack that only best asked for
                kw.setdefault("domain", parse_domain(domain))
            est = build_estimator(name, **kw)
            start = time.perf_counter()
            values = est(model, x, y, p=order)
            seconds = time.perf_counter() - start
            results[name] = _result(est, values, seconds, order)
        return results[name]

    for name in names:
        if name != "best":
            run(name)
    if "best" in names:
        best_params = dict(params.get("best", {}))
        attacks = (
            best_params.pop("attacks", None) or [n for n in names if _is_attack(n)] or best_attacks(order)
        )
        best = build_estimator("best", attacks=attacks, **best_params)  # validates the names
        assert isinstance(best, Best) and best.attacks is not None  # the registry's "best", attacks given
        # Timed once: an attack that already has its result is reused at no cost; one run here is
        # charged to best alone (it gets no column of its own).
        start = time.perf_counter()
        parts = [run(a) for a in best.attacks]
        values = combine_upper_bounds([r.values for r in parts])
        results["best"] = _result(best, values, time.perf_counter() - start, order)
    return {name: results[name] for name in names}


def _result(est: Estimator, values: torch.Tensor, seconds: float, p: float) -> MarginResult:
    """The result of one estimator's call, with what its hooks say about it."""
    columns, arrays = est.point_columns(), est.point_arrays()
    for what, extra in (("point_columns", columns), ("point_arrays", arrays)):
        for key, v in extra.items():
            if len(v) != len(values):  # a bug in the estimator, not a user mistake
                raise ValueError(
                    f"{est.name}.{what}()[{key!r}] has {len(v)} entries for {len(values)} points"
                )
    return MarginResult(
        est.name,
        est.result_kind(),
        values,
        _fields(est),
        seconds,
        p,
        est.result_domain(),
        columns,
        arrays,
    )


_PLAIN = (str, int, float, bool, type(None))


def _fields(est: Estimator) -> dict[str, Any]:
    """The estimator's settings as plain JSON values: its init fields only (state such as a solver's
    per-point details is not a setting), tuples as lists, and nothing that is not a plain value."""
    out: dict[str, Any] = {}
    for f in fields(est):
        value = getattr(est, f.name)
        if isinstance(value, tuple | list):
            value = list(value)
        plain = isinstance(value, _PLAIN) or (
            isinstance(value, list) and all(isinstance(v, _PLAIN) for v in value)
        )
        if f.init and plain:
            out[f.name] = value
    return out
