"""The verdicts of a ``compare`` run: per base, each recipe against ``standard``, and findings in words.

:func:`summarize` compares the rows of :func:`marginlab.experiments.compare_results.collect`: clean
accuracy (a recipe far below standard's is not compared at all), the test mean margin (paired over
seeds, :func:`marginlab.core.stats.paired_ci`) and the worst-case robust accuracy per radius (paired over
the same test points, :func:`marginlab.core.stats.paired_difference`, and over seeds). Its findings say
either way whether ``regularized`` beats ``standard`` on mean margin and on robust accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marginlab.core.stats import ci_over_seeds, paired_ci, paired_difference
from marginlab.experiments.compare_config import Config
from marginlab.experiments.compare_results import Row, collect, metric_key
from marginlab.experiments.compare_tables import notes

MAX_ACCURACY_GAP = 0.10  # a recipe this far below standard's clean accuracy is not compared


def _versus(std: Row, other: Row) -> dict[str, Any]:
    """``other`` recipe against ``standard``: clean accuracy, test mean margin, and robust accuracy per
    radius (worst case), paired over the same test points and seeds."""
    recipe = other["recipe"]
    ca, cb = std.get("clean_acc"), other.get("clean_acc")
    m0, m1 = std.get("test_mean_margin"), other.get("test_mean_margin")
    out: dict[str, Any] = {
        "clean_accuracy": {"standard": ca, recipe: cb},
        # a model that did not train (e.g. stuck at chance) is trivially "robust" where it predicts one
        # class everywhere: its margins and robust accuracy say nothing about the regularizer
        "comparable": ca is not None and cb is not None and cb >= ca - MAX_ACCURACY_GAP,
        "mean_margin": {
            "standard": m0,
            recipe: m1,
            "higher": None if m0 is None or m1 is None else m1 > m0,
            **paired_ci(_per_seed(std), _per_seed(other)),
        },
        "robust_accuracy": [],
    }
    for j, e in enumerate(std["eps"]):
        a, b = std.get(metric_key("worst", e)), other.get(metric_key("worst", e))
        entry = {"eps": e, "reference": e == std["eps_ref"], "standard": a, recipe: b}
        entry |= paired_difference(std["_robust"][j], other["_robust"][j])  # over points (seeds pooled)
        entry["over_seeds"] = paired_ci(*_per_seed_worst(std, other, j))  # the seeds' own spread
        out["robust_accuracy"].append(entry)
    ref = next(r for r in out["robust_accuracy"] if r["reference"])
    margin = out["mean_margin"]
    out["beats_standard"] = {
        "mean_margin": bool(out["comparable"] and margin["higher"]),
        "mean_margin_beyond_noise": bool(out["comparable"] and margin["higher"] and margin["beyond_noise"]),
        "robust_accuracy": bool(out["comparable"] and ref["delta"] > 0 and _robust_beyond_noise(ref)),
        "robust_accuracy_any_eps": bool(
            out["comparable"]
            and any(r["delta"] > 0 and _robust_beyond_noise(r) for r in out["robust_accuracy"])
        ),
    }
    return out


def _robust_beyond_noise(entry: dict[str, Any]) -> bool:
    """A robust-accuracy change is beyond noise when it is beyond the paired noise over the test points
    and, with two or more seeds, its paired interval over seeds excludes 0 as well."""
    seeds = entry.get("over_seeds") or {}
    return bool(entry["beyond_noise"] and (seeds.get("ci") is None or seeds.get("beyond_noise")))


def _per_seed(row: Row) -> list[float | None]:
    return row.get("_per_seed_mean_margin", [row.get("test_mean_margin")])


def _per_seed_worst(std: Row, other: Row, j: int) -> tuple[list[Any], list[Any]]:
    """Worst-case robust accuracy at the j-th radius, seed by seed, of ``std`` and ``other``."""

    def values(row: Row) -> list[Any]:
        per = row.get("_per_seed_worst")
        return per[j] if per else [row.get(metric_key("worst", row["eps"][j]))]

    return values(std), values(other)


def _finding(base: str, recipe: str, v: dict[str, Any], est: str) -> list[str]:
    """The verdict in words: one sentence on the mean margin, one on worst-case robust accuracy (or one
    saying that the two recipes cannot be compared)."""
    mm, acc = v["mean_margin"], v["robust_accuracy"]
    ref = next(r for r in acc if r["reference"])
    if None in (mm["standard"], mm[recipe], ref["standard"], ref[recipe]):
        return [f"{base}: {recipe} vs standard could not be compared (missing numbers)"]
    if not v["comparable"]:
        ca = v["clean_accuracy"]
        return [
            f"{base}: {recipe} did NOT train as well as standard (clean accuracy {ca[recipe]:.1%} vs "
            f"{ca['standard']:.1%}), so its margins ({mm[recipe]:.3g} vs {mm['standard']:.3g}) and robust "
            f"accuracy at eps={ref['eps']:g} ({ref[recipe]:.1%} vs {ref['standard']:.1%}) compare nothing"
        ]
    margin = "raises" if mm["higher"] else "does NOT raise"
    robust = [_robust_change(recipe, ref)]
    biggest = max(acc, key=lambda r: abs(r["delta"]))
    if biggest is not ref and _robust_beyond_noise(biggest):
        robust.append(_robust_change(recipe, biggest))
    return [
        f"{base}: {recipe} {margin} the test mean margin ({est}: {mm['standard']:.3g} -> {mm[recipe]:.3g}"
        f"{_seeds_ci(mm, '.3g')})",
        f"{base}: {recipe} " + "; it ".join(robust),
    ]


def _robust_change(recipe: str, r: dict[str, Any]) -> str:
    verb = "improves" if r["delta"] > 0 else "does NOT improve"
    noise = "beyond" if r["beyond_noise"] else "within"
    return (
        f"{verb} the worst-case robust accuracy at eps={r['eps']:g} ({r['standard']:.1%} -> "
        f"{r[recipe]:.1%}; {noise} the paired noise over test points, {r['noise_2se']:.1%}"
        f"{_seeds_ci(r.get('over_seeds') or {}, '+.1%')})"
    )


def _seeds_ci(d: dict[str, Any], fmt: str) -> str:
    """``; beyond noise over 3 seeds: paired 95% CI of the difference [lo, hi]`` (or that there is none)."""
    if d.get("ci") is None:
        return "; one seed: no interval over seeds"
    noise = "beyond noise" if d["beyond_noise"] else "within noise"
    return f"; {noise} over {d['seeds']} seeds: {ci_over_seeds(d, fmt)}"


def summarize(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Per base: the seed-averaged numbers of every recipe, each recipe against ``standard``, and findings
    that say in words whether ``regularized`` beats ``standard`` on mean margin and robust accuracy."""
    rows = collect(cfg, run_dir)
    bases: dict[str, Any] = {}
    findings: list[str] = []
    for base in cfg.bases:
        mine = {r["recipe"]: r for r in rows if r["base"] == base.name}
        entry: dict[str, Any] = {
            "eps_ref": base.reference_eps,
            "eps": next(iter(mine.values()))["eps"],
            "recipes": {
                k: {c: v for c, v in r.items() if not c.startswith("_") and c not in ("base", "recipe")}
                for k, r in mine.items()
            },
        }
        std = mine.get("standard")
        for recipe, row in mine.items():
            if std is None or recipe == "standard":
                continue
            v = _versus(std, row)
            entry.setdefault("vs_standard", {})[recipe] = v
            findings += _finding(base.name, recipe, v, std["margin_estimator"])
        reg = entry.get("vs_standard", {}).get("regularized")
        entry["regularized_beats_standard"] = reg["beats_standard"] if reg else None
        bases[base.name] = entry
    if all(b["regularized_beats_standard"] is None for b in bases.values()):
        findings.append("regularized vs standard: not compared (`recipes` lacks one of them)")
    return {
        "bases": bases,
        "findings": findings,
        "notes": notes(cfg),
        "recipes": list(cfg.recipes),
        "seeds": list(cfg.seeds),
    }
