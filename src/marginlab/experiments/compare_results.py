"""The numbers of a ``compare`` run, read from its sub-runs' files only: one row per base × recipe.

Each sub-run ``runs/<base>/<recipe>-seed<k>/`` contributes its ``summary.json`` (clean accuracy, the last
epoch's tracked margins), its ``config.json`` (which estimator tracked them), its ``metrics.jsonl`` (the
training time of every epoch, tracking left out: :func:`training_seconds`) and its ``robustness.json``
(certified and robust accuracy at every radius, per stage, the per-point worst-case flags and the margin
bounds of the fixed test points: :func:`point_margin_stats`), each read by its reader in
:mod:`marginlab.lab.readers`. :func:`collect`
averages the seeds of a base × recipe into one :data:`Row`; :mod:`marginlab.experiments.compare_tables`
writes the rows as tables and :mod:`marginlab.experiments.compare_verdicts` compares them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from marginlab.experiments.compare_config import Config
from marginlab.lab.names import subrun_dir
from marginlab.lab.readers import read_config, read_metrics, read_robustness, read_summary
from marginlab.robustness import RobustnessResult
from marginlab.training.records import training_seconds

Row = dict[str, Any]
"""One base × recipe (or one seed, :func:`seed_metrics`): ``clean_acc``, ``train_``/``test_`` ``min_margin``
and ``mean_margin``, the robustness figures as ``"<what>@<eps>"`` columns (:func:`metric_key`), ``eps``,
``eps_ref``, ``first_attack``, ``warnings``, the training cost ``train_wall_s`` / ``train_cpu_s`` and the
margin distribution of the fixed test points (``upper_<stat>`` of the min-norm bound, ``lower_<stat>`` of
the certified radius, :data:`POINT_STATS`); private columns (``_robust [len(eps), n]``, ``_certified
[len(eps), n]``, ``_upper [n]``, ``_per_seed_mean_margin``, ``_per_seed_worst``, ``_seeds``: the per-seed
rows) carry what the paired comparisons need."""

POINT_STATS = ("min", "q25", "median", "q75", "mean")
"""The statistics of a per-point margin distribution (``mean`` over the finite values only)."""


def metric_key(what: str, eps: float) -> str:
    """The column of ``what`` (an attack, ``bound``, ``certified`` or ``worst``) at radius ``eps``:
    ``"pgd@1.5"``."""
    return f"{what}@{eps:g}"


def _at(res: dict[str, Any], key: str, eps: float, attack: str | None = None) -> float | None:
    """A robustness figure of ``res`` at radius ``eps`` (None where it was not evaluated)."""
    values = res.get(key) if attack is None else (res.get(key) or {}).get(attack)
    for e, v in zip(res.get("eps", []), values or [], strict=False):
        if abs(e - eps) <= 1e-9 * max(1.0, eps):
            return v
    return None


def _mean(values: list[Any]) -> float | None:
    """The mean of the values that are not None (None when none is)."""
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def point_margin_stats(values: np.ndarray | None, prefix: str) -> Row:
    """``<prefix>_<stat>`` for :data:`POINT_STATS` of per-point margins ``values [n]`` (signed; ±inf where
    the bound is infinite): quantiles of all points (no interpolation, so infinities are kept), the mean
    of the finite ones. All ``None`` without values."""
    if values is None or len(values) == 0:
        return {f"{prefix}_{k}": None for k in POINT_STATS}
    v = np.asarray(values, dtype=np.float64)
    q = np.quantile(v, [0.25, 0.5, 0.75], method="inverted_cdf")
    finite = v[np.isfinite(v)]
    stats = [float(v.min()), *map(float, q), float(finite.mean()) if len(finite) else None]
    return {f"{prefix}_{k}": x for k, x in zip(POINT_STATS, stats, strict=True)}


def certified_flags(res: RobustnessResult) -> np.ndarray | None:
    """Per radius and point whether the point is certified: correct with certified radius >= eps
    (``[len(eps), n]`` bool; ``None`` without certificates)."""
    lower = res.margin_lower()
    if lower is None or res.certified is None:
        return None
    correct = np.asarray(res.points["correct"], dtype=bool)
    return np.stack([correct & (lower >= e) for e in res.eps]) if res.eps else None


def seed_metrics(path: Path) -> Row:
    """The numbers of one sub-run: clean accuracy, last-epoch margins, robustness at every radius, the
    margin distribution of the fixed test points and the training cost."""
    s, tcfg, rr = read_summary(path), read_config(path), read_robustness(path)
    res = rr.to_dict()
    est = tcfg["tracking"]["estimators"][0]
    margins = s.get("margins", {}).get(est, {})
    out: Row = {
        "epochs": s.get("epochs"),
        "lr": s.get("lr"),
        "margin_estimator": est,
        "clean_acc": s.get("clean_accuracy", {}).get("test"),
    }
    for split in ("train", "test"):
        last = margins.get(split, {}).get("last", {})
        out[f"{split}_min_margin"], out[f"{split}_mean_margin"] = last.get("min"), last.get("mean")
    first = res["settings"]["attacks"][0]
    for e in res["eps"]:
        out[metric_key("certified", e)] = _at(res, "certified", e)  # None: no certificates (or an old file)
        out[metric_key("bound", e)] = _at(res, "bound_share", e)
        for a in res["settings"]["attacks"]:
            out[metric_key(a, e)] = _at(res, "accuracy", e, a)
        out[metric_key("worst", e)] = _at(res, "worst_case", e)
    out["first_attack"], out["eps"], out["n_points"] = first, res["eps"], res["n"]
    out["warnings"] = res.get("warnings", [])
    out["_robust"] = np.asarray(res["points"]["robust"], dtype=bool)  # [len(eps), n], for paired tests
    out["train_wall_s"], out["train_cpu_s"] = training_seconds(read_metrics(path))
    upper, lower = rr.margin_upper(), rr.margin_lower()
    out["margin_bound"] = (rr.bound or {}).get("estimator")
    out["certifier"] = (rr.certifier or {}).get("estimator")
    out |= point_margin_stats(upper, "upper") | point_margin_stats(lower, "lower")
    out["_upper"], out["_certified"] = upper, certified_flags(rr)
    return out


# the same in every seed of a base × recipe: taken from the first seed, not averaged
_SHARED = (
    "epochs", "lr", "n_points", "eps", "warnings", "margin_estimator", "first_attack", "margin_bound",
    "certifier", "_robust", "_upper", "_certified",
)  # fmt: skip
_POOLED = ("_robust", "_upper", "_certified")  # per-point arrays: the seeds' points side by side


def collect(cfg: Config, run_dir: Path) -> list[Row]:
    """One row per base × recipe: seed-averaged metrics, with the radii and warnings of its sub-runs."""
    rows = []
    for base in cfg.bases:
        for recipe in cfg.recipes:
            per_seed = [seed_metrics(subrun_dir(run_dir, base.name, recipe, k)) for k in cfg.seeds]
            keys = [k for k in per_seed[0] if k not in _SHARED]
            row: Row = {
                "base": base.name,
                "model": base.model_name,
                "recipe": recipe,
                "dataset": base.config.get("data", {}).get("dataset"),
                "seeds": len(cfg.seeds),
                "eps_ref": base.reference_eps,
            }
            row.update({k: _mean([m.get(k) for m in per_seed]) for k in keys})
            row.update({k: per_seed[0][k] for k in _SHARED if k not in ("warnings", *_POOLED)})
            row |= {k: _pool([m[k] for m in per_seed]) for k in _POOLED}
            row["_per_seed_mean_margin"] = [m.get("test_mean_margin") for m in per_seed]  # paired over seeds
            row["_per_seed_worst"] = [[m.get(metric_key("worst", e)) for m in per_seed] for e in row["eps"]]
            row["warnings"] = sorted({w for m in per_seed for w in m["warnings"]})
            row["_seeds"] = per_seed
            rows.append(row)
    return rows


def _pool(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    """Per-point arrays of every seed side by side (along the last axis); None if any seed lacks one."""
    if any(a is None for a in arrays):
        return None
    return np.concatenate([a for a in arrays if a is not None], axis=-1)


def per_seed(row: Row, key: str) -> list[Any]:
    """The value of column ``key`` in each seed of a row (the row's own value when it has no seeds)."""
    seeds = row.get("_seeds")
    return [m.get(key) for m in seeds] if seeds else [row.get(key)]
