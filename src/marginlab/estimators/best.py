"""``best``: the per-point tightest upper bound over several attacks, and :func:`estimate_margins`."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from marginlab.errors import ConfigError
from marginlab.estimators.base import (
    ESTIMATORS,
    Estimator,
    MarginKind,
    build_estimator,
    register,
    validate_params,
)

DEFAULT_BEST = ("deepfool", "ddn")


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
    """Per-point minimum over ``attacks`` (default DeepFool and DDN) of the perturbation norm found."""

    kind = MarginKind.UPPER
    needs = frozenset({"grad"})
    attacks: tuple[str, ...] = DEFAULT_BEST

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attacks = tuple(self.attacks)
        bad = [a for a in self.attacks if not _is_attack(a)]
        if not self.attacks or bad:
            raise ConfigError(f"best combines attacks (upper bounds) only; not: {', '.join(bad) or '(none)'}")

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        values = [build_estimator(a, batch_size=len(x))(model, x, y, p=p) for a in self.attacks]
        return combine_upper_bounds(values)


def estimate_margins(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: Sequence[str],
    *,
    p: float | str = 2,
    batch_size: int | None = None,
    params: dict[str, dict[str, object]] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Signed margins ``{name: [N] float64 CPU}`` of ``x [N,C,H,W]``, ``y [N]`` for each estimator named.

    ``params`` maps an estimator name to its keyword parameters; ``batch_size`` overrides every
    estimator's batch size; ``device`` moves the model there first (else it stays where it is).
    ``"best"`` reuses the attacks computed for the other names (its own ``attacks`` parameter, or
    DeepFool and DDN, when no attack is named).
    """
    params = params or {}
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ConfigError(f"params given for {unknown[0]!r}, which is not among the estimators {list(names)}")
    for name in names:
        ESTIMATORS.get(name)  # fail on a typo before any long computation
    params = {name: validate_params(name, kw) for name, kw in params.items()}  # and on a bad value
    if device is not None:
        model.to(device)
    results: dict[str, torch.Tensor] = {}

    def run(name: str) -> torch.Tensor:
        if name not in results:
            kw = dict(params.get(name, {}))
            if batch_size is not None:
                kw["batch_size"] = batch_size
            results[name] = build_estimator(name, **kw)(model, x, y, p=p)
        return results[name]

    for name in names:
        if name != "best":
            run(name)
    if "best" in names:
        best_params = dict(params.get("best", {}))
        attacks = best_params.pop("attacks", None) or [n for n in names if _is_attack(n)] or DEFAULT_BEST
        attacks = build_estimator("best", attacks=attacks).attacks  # validates the names
        results["best"] = combine_upper_bounds([run(a) for a in attacks])
    return {name: results[name] for name in names}
