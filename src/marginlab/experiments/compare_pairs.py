"""Paired comparisons of two recipes of a ``compare`` run, from the rows of
:func:`marginlab.experiments.compare_results.collect`: the numbers behind every verdict.

:func:`versus` compares ``other`` against a baseline recipe (``standard``, or ``constraint`` in an
ablation) on the same base: clean accuracy (a recipe far below the baseline's is not compared at all), the
tracked test mean margin (paired over seeds, :func:`marginlab.core.stats.paired_ci`), the worst-case
robust and the certified accuracy per radius (paired over the same test points,
:func:`marginlab.core.stats.paired_difference`, and over seeds), the mean of the min-norm margin bound on
the fixed test points (paired over points and over seeds) and, against ``standard``, the training cost as
a ratio (:func:`cost_ratio`, under the key ``time``: timings differ between two runs of the same seed,
and ``scripts/diff_runs.py`` skips keys so named). Every entry is keyed by the two recipes' names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from marginlab.core.stats import paired_ci, paired_difference
from marginlab.experiments.compare_results import Row, metric_key, per_seed

MAX_ACCURACY_GAP = 0.10  # a recipe this far below the baseline's clean accuracy is not compared
COST_BASELINE = "standard"  # training cost is stated relative to this recipe


def versus(base: Row, other: Row) -> dict[str, Any]:
    """``other`` against ``base`` (two recipes of one base): see the module doc. ``beats`` says which
    claims hold (each False when the two are not comparable)."""
    b, o = base["recipe"], other["recipe"]
    ca, cb = base.get("clean_acc"), other.get("clean_acc")
    m0, m1 = base.get("test_mean_margin"), other.get("test_mean_margin")
    out: dict[str, Any] = {
        "baseline": b,
        "clean_accuracy": {
            b: ca,
            o: cb,
            **paired_ci(per_seed(base, "clean_acc"), per_seed(other, "clean_acc")),
        },
        # a model that did not train (e.g. stuck at chance) is trivially "robust" where it predicts one
        # class everywhere: its margins and robust accuracy say nothing about the recipe
        "comparable": ca is not None and cb is not None and cb >= ca - MAX_ACCURACY_GAP,
        "mean_margin": {
            b: m0,
            o: m1,
            "higher": None if m0 is None or m1 is None else m1 > m0,
            **paired_ci(_margins(base), _margins(other)),
        },
        "robust_accuracy": _per_radius(base, other, "worst", "_robust"),
    }
    if base.get("_certified") is not None and other.get("_certified") is not None:
        out["certified_accuracy"] = _per_radius(base, other, "certified", "_certified")
    if base.get("_upper") is not None and other.get("_upper") is not None:
        out["point_margin"] = _point_margin(base, other)
    if b == COST_BASELINE:
        out["time"] = {
            what: cost_ratio(per_seed(base, f"train_{what}_s"), per_seed(other, f"train_{what}_s"))
            for what in ("wall", "cpu")
        }
    out["beats"] = _beats(out)
    return out


def _beats(v: dict[str, Any]) -> dict[str, bool]:
    """Which claims of a :func:`versus` entry hold: higher mean margin (beyond the noise over seeds),
    higher robust (and certified) accuracy beyond noise at the reference radius or at any radius."""
    ok, margin = bool(v["comparable"]), v["mean_margin"]
    ref = reference(v["robust_accuracy"])
    out = {
        "mean_margin": ok and bool(margin["higher"]),
        "mean_margin_beyond_noise": ok and bool(margin["higher"] and margin["beyond_noise"]),
        "robust_accuracy": ok and ref["delta"] > 0 and robust_beyond_noise(ref),
        "robust_accuracy_any_eps": ok
        and any(r["delta"] > 0 and robust_beyond_noise(r) for r in v["robust_accuracy"]),
    }
    if "certified_accuracy" in v:
        cert = reference(v["certified_accuracy"])
        out["certified_accuracy"] = ok and cert["delta"] > 0 and robust_beyond_noise(cert)
    if "point_margin" in v:
        pm = v["point_margin"]
        out["point_margin"] = ok and bool(pm["over_points"]["beyond_noise"]) and (pm["diff"] or 0) > 0
    return out


def reference(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The entry at the reference radius of a per-radius list."""
    return next(r for r in entries if r["reference"])


def _per_radius(base: Row, other: Row, what: str, flags: str) -> list[dict[str, Any]]:
    """Accuracy ``what`` (``worst`` or ``certified``) per radius: the two values, the paired change over
    the pooled test points (``delta``, ``noise_2se``, ``beyond_noise``) and over seeds (``over_seeds``)."""
    b, o = base["recipe"], other["recipe"]
    out = []
    for j, e in enumerate(base["eps"]):
        key = metric_key(what, e)
        entry = {"eps": e, "reference": e == base["eps_ref"], b: base.get(key), o: other.get(key)}
        entry |= paired_difference(np.asarray(base[flags][j]), np.asarray(other[flags][j]))
        entry["over_seeds"] = paired_ci(_seed_values(base, what, j), _seed_values(other, what, j))
        out.append(entry)
    return out


def _seed_values(row: Row, what: str, j: int) -> list[Any]:
    """Accuracy ``what`` at the j-th radius, seed by seed."""
    if what == "worst" and row.get("_per_seed_worst"):
        return list(row["_per_seed_worst"][j])
    return per_seed(row, metric_key(what, row["eps"][j]))


def _seeds_ci(base: Row, other: Row, key: str) -> dict[str, Any]:
    """The paired interval over seeds of column ``key`` (:func:`marginlab.core.stats.paired_ci`)."""
    return dict(paired_ci(per_seed(base, key), per_seed(other, key)))


def _margins(row: Row) -> list[float | None]:
    return row.get("_per_seed_mean_margin", [row.get("test_mean_margin")])


def _point_margin(base: Row, other: Row) -> dict[str, Any]:
    """The min-norm margin bound on the fixed test points: its mean per recipe, the mean paired difference
    over the points where both are finite (``over_points``: t interval, ``points``) and over seeds."""
    u0, u1 = np.asarray(base["_upper"], dtype=np.float64), np.asarray(other["_upper"], dtype=np.float64)
    both = np.isfinite(u0) & np.isfinite(u1)
    points = paired_ci(u0[both].tolist(), u1[both].tolist())
    over_points = {"ci": points["ci"], "points": points["seeds"], "beyond_noise": points["beyond_noise"]}
    return {
        base["recipe"]: base.get("upper_mean"),
        other["recipe"]: other.get("upper_mean"),
        "diff": points["diff"],
        "over_points": over_points,
        "over_seeds": _seeds_ci(base, other, "upper_mean"),
    }


def cost_ratio(base: list[Any], other: list[Any]) -> dict[str, Any]:
    """Training time of ``other`` relative to ``base``, paired by seed: the geometric mean of the
    per-seed ratios, its 95% interval (a t interval of the log ratios, exponentiated; None with one seed)
    and whether it excludes 1. Seeds where either time is missing are dropped."""
    pairs = [
        (float(a), float(c))
        for a, c in zip(base, other, strict=True)
        if isinstance(a, int | float) and isinstance(c, int | float) and a > 0 and c > 0
    ]
    if not pairs:
        return {"ratio": None, "ci": None, "seeds": 0, "beyond_noise": False, "seconds": None}
    logs = paired_ci([math.log(a) for a, _ in pairs], [math.log(c) for _, c in pairs])
    diff = logs["diff"] if logs["diff"] is not None else 0.0
    return {
        "ratio": math.exp(diff),
        "ci": None if logs["ci"] is None else [math.exp(x) for x in logs["ci"]],
        "seeds": logs["seeds"],
        "beyond_noise": logs["beyond_noise"],
        "seconds": [sum(a for a, _ in pairs) / len(pairs), sum(c for _, c in pairs) / len(pairs)],
    }


def robust_beyond_noise(entry: dict[str, Any]) -> bool:
    """An accuracy change is beyond noise when it is beyond the paired noise over the test points and,
    with two or more seeds, its paired interval over seeds excludes 0 as well."""
    seeds = entry.get("over_seeds") or {}
    return bool(entry["beyond_noise"] and (seeds.get("ci") is None or seeds.get("beyond_noise")))
