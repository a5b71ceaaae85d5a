"""The numbers of a ``compare`` run, read from its sub-runs' files only: one row per base × recipe.

Each sub-run ``runs/<base>/<recipe>-seed<k>/`` contributes its ``summary.json`` (clean accuracy, the last
epoch's tracked margins), its ``config.json`` (which estimator tracked them) and its ``robustness.json``
(certified and robust accuracy at every radius, per stage, and the per-point worst-case flags), each read
by its reader
in :mod:`marginlab.lab.readers`. :func:`collect`
averages the seeds of a base × recipe into one :data:`Row`; :mod:`marginlab.experiments.compare_tables`
writes the rows as tables and :mod:`marginlab.experiments.compare_verdicts` compares them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from marginlab.experiments.compare_config import Config
from marginlab.lab.names import subrun_dir
from marginlab.lab.readers import read_config, read_robustness, read_summary

Row = dict[str, Any]
"""One base × recipe (or one seed, :func:`seed_metrics`): ``clean_acc``, ``train_``/``test_`` ``min_margin``
and ``mean_margin``, the robustness figures as ``"<what>@<eps>"`` columns (:func:`metric_key`), ``eps``,
``eps_ref``, ``first_attack``, ``warnings``; private columns (``_robust [len(eps), n]``,
``_per_seed_mean_margin``, ``_per_seed_worst``) carry what the paired comparisons need."""


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


def seed_metrics(path: Path) -> Row:
    """The numbers of one sub-run: clean accuracy, last-epoch margins, robustness at every radius."""
    s, tcfg, res = read_summary(path), read_config(path), read_robustness(path).to_dict()
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
    return out


# the same in every seed of a base × recipe: taken from the first seed, not averaged
_SHARED = ("epochs", "lr", "n_points", "eps", "warnings", "margin_estimator", "first_attack", "_robust")


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
            row.update({k: per_seed[0][k] for k in _SHARED if k not in ("warnings", "_robust")})
            row["_robust"] = np.concatenate([m["_robust"] for m in per_seed], axis=1)  # seeds side by side
            row["_per_seed_mean_margin"] = [m.get("test_mean_margin") for m in per_seed]  # paired over seeds
            row["_per_seed_worst"] = [[m.get(metric_key("worst", e)) for m in per_seed] for e in row["eps"]]
            row["warnings"] = sorted({w for m in per_seed for w in m["warnings"]})
            rows.append(row)
    return rows
