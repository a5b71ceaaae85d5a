"""Margin brackets: per point, a certified lower bound (``crown``), the best attack's upper bound (``best``)
and, where requested and solved, the exact margin (``mip``), all in one domain. The command is
:mod:`marginlab.commands.bracket`, the figure :mod:`marginlab.plots.bracket`.

    marginlab margins --model mnist-mlp --weights model.pt --data mnist --estimators bracket --out b/
    marginlab margins ... --estimators bracket,mip --param bracket.time_limit=30 --out b/

writes into ``b/``: ``margins.csv`` (index, label, prediction, crown, best, ratio, and with ``mip`` the
exact margin, its status and the certified lower end of its search), ``summary.json`` (median and
90th-percentile ``ratio``,
times) and the figure ``bracket.png``. ``ratio = |best| / |crown| >= 1`` measures how well the margin
is known: the true margin lies within that factor of either end. Points whose lower bound is 0 (or
whose attack failed) have an infinite ratio; they are counted, and the quantiles are taken over every point.

Domain: ``bracket.domain`` (``box``, default, or ``rd``) applies to ``crown`` and ``mip``; the attacks
search inside the box, so their bounds hold in both domains.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Required, TypedDict

import torch
from torch import nn

from marginlab.base.inputs import check_model_outputs
from marginlab.bounds.crown import CROWN_BUDGET
from marginlab.core.predict import predict_logits
from marginlab.estimators import build_estimator, combine_upper_bounds
from marginlab.estimators.base import evaluating, model_device
from marginlab.estimators.mip import Mip
from marginlab.estimators.presets import bracket_attacks

PARAMS = ("domain", "attacks", "time_limit", "rtol", "crown_budget")


@dataclass
class Bracket:
    """Per point ``[N]`` (float64): signed ``lower`` (crown), ``upper`` (best), ``exact`` (NaN where not
    asked or not solved), ``exact_lower`` (the mip's own certified lower end, signed) and ``status``
    (mip's: ``exact``, ``time limit`` or ``unsolved``; "" without mip)."""

    lower: torch.Tensor
    upper: torch.Tensor
    exact: torch.Tensor
    status: list[str]
    exact_lower: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> torch.Tensor:
        """``|upper| / |lower|`` ``[N]`` (``inf`` where the lower bound is 0 or the attack failed)."""
        lo, up = self.lower.abs(), self.upper.abs()
        return torch.where(lo > 0, up / lo, torch.full_like(up, math.inf))


def compute_bracket(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    p: float,
    domain: str = "box",
    attacks: tuple[str, ...] | None = None,
    exact: bool = False,
    time_limit: float = 60.0,
    rtol: float = 1e-3,
    crown_budget: int = CROWN_BUDGET,
    batch_size: int = 64,
) -> Bracket:
    """Brackets of ``x [N,C,H,W]``, ``y [N]``: crown, best (``attacks``, default DeepFool+DDN for L2,
    DeepFool+FMN for L-inf) and, with ``exact``, the mip estimator with ``time_limit`` s per point. A model
    with non-finite logits on any point is refused (:func:`marginlab.base.inputs.check_model_outputs`)."""
    with evaluating(model):  # the checks estimate_margins makes: finite logits on every point, no softmax
        check_model_outputs(predict_logits(model, x, batch_size, device=model_device(model)), y)
    if attacks is None:
        attacks = bracket_attacks(p)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    crown = build_estimator(
        "crown", domain=domain, rtol=rtol, crown_budget=crown_budget, batch_size=batch_size
    )
    lower = crown(model, x, y, p=p)
    seconds["crown"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    upper = combine_upper_bounds(
        [build_estimator(a, batch_size=batch_size)(model, x, y, p=p) for a in attacks]
    )
    seconds["best"] = time.perf_counter() - t0
    nan = torch.full_like(lower, math.nan)
    if not exact:
        return Bracket(lower, upper, nan, ["" for _ in range(len(x))], nan.clone(), seconds)
    t0 = time.perf_counter()
    mip = build_estimator("mip", domain=domain, time_limit=time_limit, batch_size=batch_size)
    assert isinstance(mip, Mip)  # the registry's "mip": its point columns hold each point's status
    values = mip(model, x, y, p=p)
    seconds["mip"] = time.perf_counter() - t0
    columns = mip.point_columns()
    status = [str(s) for s in columns["status"]]
    solved = torch.tensor([s == "exact" for s in status])
    lows = torch.tensor(columns["lower"], dtype=torch.float64)  # signed like the margins
    return Bracket(lower, upper, torch.where(solved, values, nan), status, lows, seconds)


class BracketSummary(TypedDict, total=False):
    """The ``bracket`` entry of the command's ``summary.json``, keys in this order: ``n`` points, the
    median and 90th percentile of ``ratio`` (``None`` where infinite), how many ratios are infinite, the
    median ``|lower|`` and ``|upper|``, each part's ``seconds``; with ``mip``, how many points it solved
    and, when any, the median exact margin and the median ratios ``|upper| / |exact|`` and
    ``|exact| / |lower|``."""

    n: Required[int]
    ratio_median: Required[float | None]
    ratio_p90: Required[float | None]
    ratio_infinite: Required[int]
    lower_median: Required[float]
    upper_median: Required[float]
    seconds: Required[dict[str, float]]
    exact_solved: int
    exact_median: float
    upper_over_exact_median: float
    exact_over_lower_median: float


def summary(b: Bracket) -> BracketSummary:
    """Median / 90th-percentile ratio and counts (JSON-ready; ``inf`` becomes ``None``)."""
    ratio = b.ratio
    big = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, 1e300))
    q = [float(v) for v in torch.quantile(big, torch.tensor([0.5, 0.9], dtype=torch.float64))]
    out: BracketSummary = {
        "n": len(ratio),
        "ratio_median": q[0] if q[0] < 1e299 else None,
        "ratio_p90": q[1] if q[1] < 1e299 else None,
        "ratio_infinite": int((~torch.isfinite(ratio)).sum()),
        "lower_median": float(b.lower.abs().median()),
        "upper_median": float(b.upper.abs().median()),
        "seconds": b.seconds,
    }
    if any(b.status):
        solved = ~torch.isnan(b.exact)
        out["exact_solved"] = int(solved.sum())
        if solved.any():
            ex = b.exact[solved].abs()
            out["exact_median"] = float(ex.median())
            out["upper_over_exact_median"] = float((b.upper[solved].abs() / ex).median())
            out["exact_over_lower_median"] = float((ex / b.lower[solved].abs()).median())
    return out
