"""The verdicts of a ``compare`` run: per base, each recipe against ``standard``, the ablations, and
findings in words.

:func:`summarize` compares the rows of :func:`marginlab.experiments.compare_results.collect` pair by pair
(:func:`marginlab.experiments.compare_pairs.versus`): clean accuracy (a recipe far below the baseline's is
not compared at all), the test mean margin (paired over seeds), the worst-case robust and the certified
accuracy per radius (paired over the same test points and over seeds), the margin bound of the fixed test
points and, against ``standard``, the training cost. The :data:`ABLATIONS` (``regularized`` vs
``constraint``: does the average-margin term add anything beyond orthogonality; ``regularized`` vs
``large-margin``) are verdicts of their own. Its findings say every verdict either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marginlab.core.stats import ci_over_seeds
from marginlab.experiments.compare_config import Config
from marginlab.experiments.compare_pairs import MAX_ACCURACY_GAP, reference, robust_beyond_noise, versus
from marginlab.experiments.compare_results import Row, collect
from marginlab.experiments.compare_tables import notes

__all__ = ["ABLATIONS", "MAX_ACCURACY_GAP", "summarize"]

ABLATIONS = (
    ("constraint", "regularized", "does the average-margin term add anything beyond orthogonality?"),
    (
        "large-margin",
        "regularized",
        "does the poster's term do better than Elsayed et al.'s large-margin loss?",
    ),
)
"""The ablation pairs (baseline, recipe, question): each is its own verdict when both are in the run."""


def _versus(std: Row, other: Row) -> dict[str, Any]:
    """``other`` recipe against ``standard`` (:func:`marginlab.experiments.compare_pairs.versus`), its
    claims under ``beats_standard``."""
    out = versus(std, other)
    out["beats_standard"] = out.pop("beats")
    return out


def _finding(base: str, recipe: str, v: dict[str, Any], est: str) -> list[str]:
    """The verdict in words against the entry's baseline (``standard`` unless named): one sentence on the
    mean margin, one on worst-case robust accuracy (or one saying that the two cannot be compared)."""
    b = v.get("baseline", "standard")
    mm, acc = v["mean_margin"], v["robust_accuracy"]
    ref = reference(acc)
    if None in (mm[b], mm[recipe], ref[b], ref[recipe]):
        return [f"{base}: {recipe} vs {b} could not be compared (missing numbers)"]
    if not v["comparable"]:
        ca = v["clean_accuracy"]
        return [
            f"{base}: {recipe} did NOT train as well as {b} (clean accuracy {ca[recipe]:.1%} vs "
            f"{ca[b]:.1%}), so its margins ({mm[recipe]:.3g} vs {mm[b]:.3g}) and robust "
            f"accuracy at eps={ref['eps']:g} ({ref[recipe]:.1%} vs {ref[b]:.1%}) compare nothing"
        ]
    margin = "raises" if mm["higher"] else "does NOT raise"
    robust = [_robust_change(b, recipe, ref, "worst-case robust")]
    biggest = max(acc, key=lambda r: abs(r["delta"]))
    if biggest is not ref and robust_beyond_noise(biggest):
        robust.append(_robust_change(b, recipe, biggest, "worst-case robust"))
    out = [
        f"{base}: {recipe} {margin} the test mean margin over {b} ({est}: {mm[b]:.3g} -> {mm[recipe]:.3g}"
        f"{_seeds_ci(mm, '.3g')})",
        f"{base}: {recipe} " + "; it ".join(robust),
    ]
    if "point_margin" in v and v["point_margin"]["diff"] is not None:
        out.append(f"{base}: {recipe} {_point_margin_change(b, recipe, v['point_margin'])}")
    if "certified_accuracy" in v:
        cert = reference(v["certified_accuracy"])
        if cert[b] is not None and cert[recipe] is not None:
            out.append(f"{base}: {recipe} {_robust_change(b, recipe, cert, 'certified')}")
    return out


def _robust_change(b: str, recipe: str, r: dict[str, Any], what: str) -> str:
    verb = "improves" if r["delta"] > 0 else "does NOT improve"
    noise = "beyond" if r["beyond_noise"] else "within"
    return (
        f"{verb} the {what} accuracy at eps={r['eps']:g} ({b} {r[b]:.1%} -> "
        f"{r[recipe]:.1%}; {noise} the paired noise over test points, {r['noise_2se']:.1%}"
        f"{_seeds_ci(r.get('over_seeds') or {}, '+.1%')})"
    )


def _point_margin_change(b: str, recipe: str, pm: dict[str, Any]) -> str:
    pts = pm["over_points"]
    verb = "raises" if pm["diff"] > 0 else "does NOT raise"
    noise = "beyond" if pts["beyond_noise"] else "within"
    ci = f": {ci_over_seeds(pts, '+.3g')}" if pts.get("ci") else ""
    return (
        f"{verb} the mean margin upper bound of the fixed test points over {b} ({_num(pm[b])} -> "
        f"{_num(pm[recipe])}; {noise} noise over {pts['points']} paired points{ci}"
        f"{_seeds_ci(pm.get('over_seeds') or {}, '+.3g')})"
    )


def _num(x: object) -> str:
    return f"{x:.3g}" if isinstance(x, int | float) else "–"


def _seeds_ci(d: dict[str, Any], fmt: str) -> str:
    """``; beyond noise over 3 seeds: paired 95% CI of the difference [lo, hi]`` (or that there is none)."""
    if d.get("ci") is None:
        return "; one seed: no interval over seeds"
    noise = "beyond noise" if d["beyond_noise"] else "within noise"
    return f"; {noise} over {d['seeds']} seeds: {ci_over_seeds(d, fmt)}"


def _cost_finding(base: str, recipe: str, cost: dict[str, Any]) -> str | None:
    """The training cost of ``recipe`` relative to ``standard`` in words (None without times)."""
    parts = []
    for what, label in (("wall", "wall"), ("cpu", "CPU")):
        c = cost.get(what) or {}
        if c.get("ratio") is None:
            continue
        s0, s1 = c["seconds"]
        ci = f", 95% CI over {c['seeds']} seeds [{c['ci'][0]:.2f}x, {c['ci'][1]:.2f}x]" if c["ci"] else ""
        parts.append(f"{c['ratio']:.2f}x standard's {label} time ({s0:.3g} s -> {s1:.3g} s{ci})")
    return f"{base}: {recipe} trains in " + " and ".join(parts) if parts else None


def _ranking(mine: dict[str, Row], eps_ref: float) -> dict[str, list[list[Any]]]:
    """Per quantity, the recipes from best to worst (``[[recipe, value], ...]``, missing values left out):
    worst-case robust and certified accuracy at the reference radius, the mean margin bound of the fixed
    test points, the tracked test mean margin, clean accuracy. A recipe far below ``standard``'s clean
    accuracy (:data:`MAX_ACCURACY_GAP`) is ranked on clean accuracy only: a model that did not train looks
    robust where it predicts one class everywhere."""
    std = (mine.get("standard") or {}).get("clean_acc")
    trained = {
        r: row
        for r, row in mine.items()
        if std is None or (row.get("clean_acc") is not None and row["clean_acc"] >= std - MAX_ACCURACY_GAP)
    }
    keys = {
        "robust_accuracy": f"worst@{eps_ref:g}",
        "certified_accuracy": f"certified@{eps_ref:g}",
        "point_mean_margin": "upper_mean",
        "test_mean_margin": "test_mean_margin",
        "clean_accuracy": "clean_acc",
    }
    out = {}
    for name, key in keys.items():
        rows = mine if name == "clean_accuracy" else trained
        values = [(r, float(v)) for r, row in rows.items() if isinstance(v := row.get(key), int | float)]
        if values:
            out[name] = [[r, v] for r, v in sorted(values, key=lambda rv: -rv[1])]
    return out


def _ranking_findings(base: str, ranking: dict[str, list[list[Any]]], eps_ref: float) -> list[str]:
    """One sentence per quantity with two or more recipes: who is highest, then the order."""
    words = {
        "robust_accuracy": (f"worst-case robust accuracy at eps={eps_ref:g}", ".1%"),
        "certified_accuracy": (f"certified accuracy at eps={eps_ref:g}", ".1%"),
        "point_mean_margin": ("mean margin upper bound of the fixed test points", ".3g"),
        "clean_accuracy": ("clean accuracy", ".1%"),
    }
    out = []
    for name, (label, fmt) in words.items():
        order = ranking.get(name, [])
        if len(order) >= 2:
            top = [r for r, v in order if v == order[0][1]]
            tied = f" ({len(top)} tied)" if len(top) > 1 else ""
            out.append(f"{base}: highest {label}: {', '.join(top)}{tied}; order: {ranked(order, fmt)}")
    return out


def ranked(order: list[list[Any]], fmt: str) -> str:
    """``a 80.0% > b 75.0% = c 75.0%``: recipes with their values, ``=`` between ties."""
    text = [f"{order[0][0]} {order[0][1]:{fmt}}"]
    for (_, before), (r, v) in zip(order, order[1:], strict=False):
        text.append(f"{'=' if v == before else '>'} {r} {v:{fmt}}")
    return " ".join(text)


def summarize(cfg: Config, run_dir: Path, rows: list[Row] | None = None) -> dict[str, Any]:
    """Per base: the seed-averaged numbers of every recipe, each recipe against ``standard`` (with its
    training cost), the :data:`ABLATIONS` present in the run, the recipes ranked per quantity, and
    findings that say all this in words, either way. ``rows``: :func:`collect`'s, when already read."""
    rows = collect(cfg, run_dir) if rows is None else rows
    bases: dict[str, Any] = {}
    findings: list[str] = []
    timings: list[str] = []  # the cost sentences: apart, as timings differ between runs of one seed
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
            cost = _cost_finding(base.name, recipe, v.get("time") or {})
            timings += [cost] if cost else []
        for b, recipe, question in ABLATIONS:
            if b in mine and recipe in mine:
                v = versus(mine[b], mine[recipe]) | {"question": question}
                entry.setdefault("ablations", {})[f"{recipe} vs {b}"] = v
                said = _finding(base.name, recipe, v, mine[b]["margin_estimator"])
                findings += [f"ablation ({question}) {s}" for s in said]
        entry["ranking"] = _ranking(mine, base.reference_eps)
        findings += _ranking_findings(base.name, entry["ranking"], base.reference_eps)
        reg = entry.get("vs_standard", {}).get("regularized")
        entry["regularized_beats_standard"] = reg["beats_standard"] if reg else None
        bases[base.name] = entry
    if all(b["regularized_beats_standard"] is None for b in bases.values()):
        findings.append("regularized vs standard: not compared (`recipes` lacks one of them)")
    return {
        "bases": bases,
        "findings": findings,
        "timings": timings,
        "notes": notes(cfg),
        "recipes": list(cfg.recipes),
        "seeds": list(cfg.seeds),
    }
