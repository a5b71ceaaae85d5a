"""``best``: the per-point tightest upper bound over several attacks, and :func:`estimate_margins`."""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.base.inputs import check_model_outputs, check_train_mode, prepare_inputs
from marginlab.core.norms import Norm
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
    """One estimator's margins of a set of points, with what kind of number they are.

    ``values [N]``: signed margins (float64, CPU; the sign rule of :mod:`marginlab.estimators.base`).
    ``kind``: exact / lower bound / upper bound / estimate. ``params``: the estimator's settings as used
    (every default resolved). ``seconds``: wall time (for ``best``: its attacks' time, which their own
    results show too).
    """

    estimator: str
    kind: MarginKind
    values: torch.Tensor
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    p: float = 2.0

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
        values = [build_estimator(a, batch_size=len(x))(model, x, y, p=p) for a in attacks]
        return combine_upper_bounds(values)


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
) -> dict[str, MarginResult]:
    """Margins ``{name: MarginResult}`` of ``x [N,C,H,W]``, ``y [N]`` for each estimator named; each result
    holds the signed margins ``values [N]`` (float64 CPU), the estimator's ``kind``, its parameters and time.

    ``x``/``y`` may be numpy arrays (``[N, H, W]`` grey images gain their channel axis); a model that
    outputs probabilities is refused (margins are defined on logits) and one in train mode is evaluated
    in eval mode with a warning (:mod:`marginlab.base.inputs`, the same checks as ``robust_accuracy``).
    ``params`` maps an estimator name to its keyword parameters; ``batch_size`` overrides every
    estimator's batch size; ``device`` moves the model there first (else it stays where it is).
    ``"best"`` reuses the attacks computed for the other names (its own ``attacks`` parameter, or
    DDN and FMN, when no attack is named).
    """
    params = params or {}
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ConfigError(f"params given for {unknown[0]!r}, which is not among the estimators {list(names)}")
    for name in names:
        ESTIMATORS.get(name)  # fail on a typo before any long computation
    params = {name: validate_params(name, kw) for name, kw in params.items()}  # and on a bad value
    order = Norm.parse(p, NORMS, error=NORM_ERROR).p  # 2.0 or inf, what the estimators get
    if device is not None:
        model.to(device)
    x, y = prepare_inputs(x, y)
    warning = check_train_mode(model)
    if warning:
        log.warning(warning)
    with evaluating(model), torch.no_grad():
        check_model_outputs(model(x[:64].to(model_device(model))), y)
    results: dict[str, MarginResult] = {}

    def run(name: str) -> MarginResult:
        if name not in results:
            kw = dict(params.get(name, {}))
            if batch_size is not None:
                kw["batch_size"] = batch_size
            est = build_estimator(name, **kw)
            start = time.perf_counter()
            values = est(model, x, y, p=order)
            seconds = time.perf_counter() - start
            results[name] = MarginResult(name, est.kind, values, _fields(est), seconds, order)
        return results[name]

    for name in names:
        if name != "best":
            run(name)
    if "best" in names:
        best_params = dict(params.get("best", {}))
        attacks = (
            best_params.pop("attacks", None) or [n for n in names if _is_attack(n)] or best_attacks(order)
        )
        best = build_estimator("best", attacks=attacks)  # validates the names
        assert isinstance(best, Best) and best.attacks is not None  # the registry's "best", attacks given
        start = time.perf_counter()
        parts = [run(a) for a in best.attacks]
        values = combine_upper_bounds([r.values for r in parts])
        seconds = time.perf_counter() - start + sum(r.seconds for r in parts)
        results["best"] = MarginResult("best", best.kind, values, _fields(best), seconds, order)
    return {name: results[name] for name in names}


def _fields(est: Estimator) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(est).items()}
