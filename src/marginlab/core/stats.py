"""Statistics of margins and paired comparisons: the one owner of these formulas in marginlab.

- :func:`margin_stats`: a distribution of per-point signed margins ``m [N]`` reduced to min, mean, max,
  the quantiles :data:`QUANTILES` (named :data:`QUANTILE_KEYS`) and the share of negative margins;
- :func:`paired_difference`: the change of robust accuracy between two models on the same points, with
  the noise level of a paired difference;
- :func:`paired_ci`: the mean and Student-t confidence interval of paired differences over seeds;
- :func:`ci_over_seeds`: such an interval in words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

import numpy as np
import torch

QUANTILES: tuple[float, ...] = (0.10, 0.25, 0.50, 0.75, 0.90)
"""The quantile levels every margin summary reports, in the order of :data:`QUANTILE_KEYS`."""
QUANTILE_KEYS: tuple[str, ...] = ("q10", "q25", "median", "q75", "q90")
"""The keys of :data:`QUANTILES` in a margin summary."""

MarginStatsForm = Literal["tracking", "gd"]

# the keys of each form, in the order they are written (the JSON files keep this order)
_FORM_KEYS: dict[str, tuple[str, ...]] = {
    "tracking": ("min", "mean", "median", "q10", "q25", "q75", "q90", "max", "neg_share"),
    "gd": ("min", "mean", "max", *QUANTILE_KEYS),
}


def margin_stats(m: torch.Tensor, *, form: MarginStatsForm = "tracking") -> dict[str, float]:
    """Summary statistics of per-point signed margins ``m [N]`` (misclassified points negative; NaN-free).

    ``min``, ``mean`` = (1/N) Σ m_i, ``max``, the quantiles ``q10``, ``q25``, ``median``, ``q75``, ``q90``
    at the levels :data:`QUANTILES` and, in the ``"tracking"`` form, ``neg_share`` = #{i : m_i < 0} / N.
    A quantile at level q is the order statistic of rank h = q (N - 1) (0-based, sorted ascending),
    interpolated linearly between ranks ⌊h⌋ and ⌈h⌉ (numpy's default).

    Two forms, each reproducing the files of the experiments that use it bit for bit:

    - ``"tracking"`` (training's margin tracking, the ``margins`` command): computed in float64 on the
      CPU; where ±inf is present (a failed attack) linear interpolation between an infinite and a finite
      value would be NaN, so the nearest order statistic is taken instead; keys ``min, mean, median,
      q10, q25, q75, q90, max, neg_share``.
    - ``"gd"`` (the ``logreg-gd`` records): computed in ``m``'s dtype on ``m``'s device, always linear
      interpolation; keys ``min, mean, max, q10, q25, median, q75, q90`` (no ``neg_share``).
    """
    if form not in _FORM_KEYS:
        raise ValueError(f"form must be one of {sorted(_FORM_KEYS)}, got {form!r}")
    m = m.detach()
    if form == "tracking":
        m = m.double().cpu()
        how = "linear" if bool(torch.isfinite(m).all()) else "nearest"
    else:
        how = "linear"
    levels = torch.tensor(QUANTILES, dtype=m.dtype, device=m.device)
    qs = torch.quantile(m, levels, interpolation=how).tolist()
    values: dict[str, float] = {"min": float(m.min()), "mean": float(m.mean()), "max": float(m.max())}
    values.update(zip(QUANTILE_KEYS, qs, strict=True))
    if form == "tracking":
        values["neg_share"] = float((m < 0).double().mean())
    return {k: values[k] for k in _FORM_KEYS[form]}


class PairedDifference(TypedDict):
    """:func:`paired_difference`: the change ``delta``, its noise level ``noise_2se`` (2 s.e.) and whether
    ``|delta|`` exceeds it."""

    delta: float
    noise_2se: float
    beyond_noise: bool


class PairedCI(TypedDict):
    """:func:`paired_ci`: the mean difference ``diff`` (None without a pair), the interval ``ci`` =
    ``[lo, hi]`` (None with fewer than two pairs), the number of ``seeds`` and whether ``ci`` excludes 0."""

    diff: float | None
    ci: list[float] | None
    seeds: int
    beyond_noise: bool


def paired_difference(before: np.ndarray, after: np.ndarray) -> PairedDifference:
    """Robust accuracy of ``after`` minus ``before`` on the same points (bool flags ``[n]`` each), with the
    2-SE noise level of a paired difference.

    With b the points robust only before and c those robust only after (McNemar's discordant pairs):
    delta = (c - b) / n and SE = sqrt(max(b + c - (c - b)² / n, 1)) / n; ``beyond_noise`` when
    |delta| > 2 SE. The floor of one discordant point's worth means 0 vs 0 is never "significant"."""
    n = max(len(before), 1)
    b, c = int((before & ~after).sum()), int((~before & after).sum())
    se = max(b + c - (c - b) ** 2 / n, 1.0) ** 0.5 / n
    delta = (c - b) / n
    return {"delta": delta, "noise_2se": 2 * se, "beyond_noise": abs(delta) > 2 * se}


def paired_ci(before: Sequence[float | None], after: Sequence[float | None], level: float = 0.95) -> PairedCI:
    """Mean and ``level`` confidence interval of the paired differences ``after - before`` over seeds.

    Pairs with a missing value (None) are dropped. With the n differences d_i = after_i - before_i, their
    mean d̄ and sample standard deviation s (ddof = 1): the Student t interval with n - 1 degrees of
    freedom, d̄ ± t_{(1 + level)/2, n-1} · s / √n; ``beyond_noise`` when it excludes 0. Fewer than two
    pairs: no interval (``ci`` None) and nothing is called beyond noise."""
    from scipy import stats  # scipy.stats takes ~0.5 s to import: only comparisons pay for it

    d = np.array([b - a for a, b in zip(before, after, strict=True) if a is not None and b is not None])
    if len(d) < 2:
        return {
            "diff": float(d.mean()) if len(d) else None,
            "ci": None,
            "seeds": len(d),
            "beyond_noise": False,
        }
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    lo, hi = float(d.mean()) - half, float(d.mean()) + half
    return {"diff": float(d.mean()), "ci": [lo, hi], "seeds": len(d), "beyond_noise": lo > 0 or hi < 0}


def ci_over_seeds(d: Mapping[str, Any], fmt: str) -> str:
    """A :func:`paired_ci` result (or its JSON) in words, ``paired 95% CI of the difference [lo, hi]``
    with both ends formatted by ``fmt`` (e.g. ``".3g"``); ``""`` when it holds no interval."""
    if d.get("ci") is None:
        return ""
    lo, hi = d["ci"]
    return f"paired 95% CI of the difference [{lo:{fmt}}, {hi:{fmt}}]"
