"""Tables and summary of a ``compare`` run, from its sub-runs' ``summary.json`` and ``robustness.json`` only.

- ``table.csv``: one row per base × recipe (seed-averaged): clean accuracy, last-epoch min/mean margins,
  robust accuracy at the reference eps (bound share, the first attack's own figure, AutoAttack, worst
  case) and the sweep as ``;``-joined columns;
- ``sweep.csv``: the same robustness numbers, one row per base × recipe × eps;
- ``table.md``: the notes on how the numbers were obtained, the headline table, per-base sweep tables
  and every sanity-check warning;
- :func:`summarize`: per base, each recipe against ``standard`` and findings in words, either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from marginlab.runs import ROBUSTNESS, SWEEP_CSV, TABLE_CSV, TABLE_MD, subrun_dir

if TYPE_CHECKING:
    from marginlab.experiments.compare import Config


def paired_difference(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """Robust accuracy of ``after`` minus ``before`` on the same points (bool flags ``[n]`` each), with the
    2-SE noise level of a paired difference: SE = sqrt(b + c - (c - b)² / n) / n for b points robust only
    before and c only after (at least one discordant point's worth, so 0 vs 0 is never "significant")."""
    n = max(len(before), 1)
    b, c = int((before & ~after).sum()), int((~before & after).sum())
    se = max(b + c - (c - b) ** 2 / n, 1.0) ** 0.5 / n
    delta = (c - b) / n
    return {"delta": delta, "noise_2se": 2 * se, "beyond_noise": abs(delta) > 2 * se}


def paired_ci(before: list[float | None], after: list[float | None], level: float = 0.95) -> dict[str, Any]:
    """Mean and ``level`` confidence interval of the paired differences ``after - before`` over seeds
    (Student t with n-1 degrees of freedom); ``beyond_noise`` when the interval excludes 0. One seed:
    no interval (``None``), nothing is called beyond noise."""
    from scipy import stats

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


def _at(res: dict[str, Any], key: str, eps: float, attack: str | None = None) -> float | None:
    """A robustness figure of ``res`` at radius ``eps`` (None where it was not evaluated)."""
    values = res.get(key) if attack is None else (res.get(key) or {}).get(attack)
    for e, v in zip(res.get("eps", []), values or [], strict=False):
        if abs(e - eps) <= 1e-9 * max(1.0, eps):
            return v
    return None


def _key(what: str, eps: float) -> str:
    """The column of ``what`` (an attack, ``bound`` or ``worst``) at radius ``eps``: ``"pgd@1.5"``."""
    return f"{what}@{eps:g}"


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def seed_metrics(path: Path) -> dict[str, Any]:
    """The numbers of one sub-run: clean accuracy, last-epoch margins, robustness at every radius."""
    from marginlab.fsio import read_json
    from marginlab.runs import read_config, read_summary

    s, tcfg, res = read_summary(path), read_config(path), read_json(path / ROBUSTNESS)
    est = tcfg["tracking"]["estimators"][0]
    margins = s.get("margins", {}).get(est, {})
    out: dict[str, Any] = {
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
        out[f"bound@{e:g}"] = _at(res, "bound_share", e)
        for a in res["settings"]["attacks"]:
            out[f"{a}@{e:g}"] = _at(res, "accuracy", e, a)
        out[f"worst@{e:g}"] = _at(res, "worst_case", e)
    out["first_attack"], out["eps"], out["n_points"] = first, res["eps"], res["n"]
    out["warnings"] = res.get("warnings", [])
    out["_robust"] = np.asarray(res["points"]["robust"], dtype=bool)  # [len(eps), n], for paired tests
    return out


# the same in every seed of a base × recipe: taken from the first seed, not averaged
_SHARED = ("epochs", "lr", "n_points", "eps", "warnings", "margin_estimator", "first_attack", "_robust")


def collect(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """One row per base × recipe: seed-averaged metrics, with the radii and warnings of its sub-runs."""
    rows = []
    for base in cfg.bases:
        for recipe in cfg.recipes:
            per_seed = [seed_metrics(subrun_dir(run_dir, base.name, recipe, k)) for k in cfg.seeds]
            keys = [k for k in per_seed[0] if k not in _SHARED]
            row: dict[str, Any] = {
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
            row["_per_seed_worst"] = [[m.get(_key("worst", e)) for m in per_seed] for e in row["eps"]]
            row["warnings"] = sorted({w for m in per_seed for w in m["warnings"]})
            rows.append(row)
    return rows


# fmt: off
HEADLINE = ["base", "model", "dataset", "recipe", "seeds", "epochs", "lr", "clean_acc", "margin_estimator",
            "train_min_margin", "train_mean_margin", "test_min_margin", "test_mean_margin", "eps_ref",
            "bound@ref", "pgd@ref", "autoattack@ref", "worst@ref"]
# fmt: on


def _headline(row: dict[str, Any]) -> list[Any]:
    ref = f"{row['eps_ref']:g}"
    vals = {k: row.get(k.replace("@ref", f"@{ref}")) for k in HEADLINE}
    sweep = [row.get(f"worst@{e:g}") for e in row["eps"]]
    first = [row.get(f"{row['first_attack']}@{e:g}") for e in row["eps"]]
    return [vals[k] for k in HEADLINE] + [
        ";".join(f"{e:g}" for e in row["eps"]),
        ";".join(_fmt(v) for v in first),
        ";".join(_fmt(v) for v in sweep),
    ]


def _fmt(v: Any) -> str:
    from marginlab.report.tables import format_cell

    return format_cell(v)


def write_tables(cfg: Config, run_dir: Path) -> None:
    """``table.csv`` (one row per base × recipe), ``sweep.csv`` (tidy, per radius) and ``table.md``."""
    from marginlab.fsio import atomic_write_text
    from marginlab.report.tables import csv_text, markdown_table

    rows = collect(cfg, run_dir)
    header = [*HEADLINE, "sweep_eps", f"sweep_{cfg.robustness.settings_for(1.0).attacks[0]}", "sweep_worst"]
    atomic_write_text(run_dir / TABLE_CSV, csv_text(header, [_headline(r) for r in rows]))
    tidy = [
        [
            r["base"],
            r["recipe"],
            e,
            r.get(f"bound@{e:g}"),
            r.get(f"pgd@{e:g}"),
            r.get(f"autoattack@{e:g}"),
            r.get(f"worst@{e:g}"),
        ]
        for r in rows
        for e in r["eps"]
    ]
    atomic_write_text(
        run_dir / SWEEP_CSV,
        csv_text(["base", "recipe", "eps", "bound", "pgd", "autoattack", "worst"], tidy),
    )
    md = [
        f"# Regularizer comparison\n\n{_notes(cfg)}\n",
        "## Headline (reference eps)\n",
        markdown_table(HEADLINE, [[_fmt(v) for v in _headline(r)[: len(HEADLINE)]] for r in rows]),
    ]
    for base in cfg.bases:
        mine = [r for r in rows if r["base"] == base.name]
        eps = mine[0]["eps"]
        md += [
            f"\n## {base.name}: robust accuracy vs eps (first attack alone / worst case)\n",
            markdown_table(
                ["recipe", *[f"eps={e:g}" for e in eps]],
                [
                    [
                        r["recipe"],
                        *[
                            f"{_fmt(r.get(_key(r['first_attack'], e)))} / {_fmt(r.get(_key('worst', e)))}"
                            for e in eps
                        ],
                    ]
                    for r in mine
                ],
            ),
        ]
        warns = [f"- {r['recipe']}: {w}" for r in mine for w in r["warnings"]]
        md += ["\nWarnings:\n\n" + "\n".join(warns) + "\n"] if warns else []
    atomic_write_text(run_dir / TABLE_MD, "\n".join(md))


def _notes(cfg: Config) -> str:
    """How the numbers were obtained, in words (the top of ``table.md`` and the summary's ``notes``)."""
    rc, s = cfg.robustness, cfg.robustness.settings_for(1.0)
    step = f"{rc.step_size_rel:g} x eps_ref" if rc.step_size_rel is not None else f"{s.step_size:g}"
    aa = s.aa_version + (f" ({', '.join(s.aa_attacks)})" if s.aa_attacks else "")
    aa += f", {s.aa_iters} iterations" if s.aa_iters else ""
    where = "the reference eps" if rc.autoattack_at == "reference" else "every eps"
    attacks = {
        "pgd": f"PGD ({s.steps} steps of {step} with random start; the reference: 1000 steps of 0.01)",
        "autoattack": f"AutoAttack {aa} at {where}",
    }
    first, *later = s.attacks
    return " ".join(
        [
            f"{rc.n} fixed test points (seed {rc.seed}), {s.norm} norm.",
            f"`bound`: share of points whose {s.bound} margin upper bound (min-norm attack) exceeds eps."
            if s.bound
            else "No min-norm bound.",
            f"`{first}`: {attacks[first]} on the points the bound left robust.",
            *[f"`{a}`: {attacks[a]}, only on the points still robust." for a in later],
            "`worst`: the reported robust accuracy (survived every evaluation).",
            "Margins: the last epoch's tracked estimate, min and mean over the tracked subsets.",
            f"Seeds {list(cfg.seeds)}, numbers averaged over seeds.",
        ]
    )


MAX_ACCURACY_GAP = 0.10  # a recipe this far below standard's clean accuracy is not compared


def _versus(std: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other`` recipe against ``standard``: clean accuracy, test mean margin, and robust accuracy per
    radius (worst case), paired over the same test points and seeds."""
    recipe = other["recipe"]
    ca, cb = std.get("clean_acc"), other.get("clean_acc")
    mm = (std.get("test_mean_margin"), other.get("test_mean_margin"))
    out: dict[str, Any] = {
        "clean_accuracy": {"standard": ca, recipe: cb},
        # a model that did not train (e.g. stuck at chance) is trivially "robust" where it predicts one
        # class everywhere: its margins and robust accuracy say nothing about the regularizer
        "comparable": None not in (ca, cb) and cb >= ca - MAX_ACCURACY_GAP,
        "mean_margin": {
            "standard": mm[0],
            recipe: mm[1],
            "higher": None if None in mm else mm[1] > mm[0],
            **paired_ci(_per_seed(std), _per_seed(other)),
        },
        "robust_accuracy": [],
    }
    for j, e in enumerate(std["eps"]):
        a, b = std.get(_key("worst", e)), other.get(_key("worst", e))
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


def _per_seed(row: dict[str, Any]) -> list[float | None]:
    return row.get("_per_seed_mean_margin", [row.get("test_mean_margin")])


def _per_seed_worst(std: dict[str, Any], other: dict[str, Any], j: int) -> tuple[list[Any], list[Any]]:
    """Worst-case robust accuracy at the j-th radius, seed by seed, of ``std`` and ``other``."""

    def values(row: dict[str, Any]) -> list[Any]:
        per = row.get("_per_seed_worst")
        return per[j] if per else [row.get(_key("worst", row["eps"][j]))]

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


def ci_over_seeds(d: dict[str, Any], fmt: str) -> str:
    """A :func:`paired_ci` result in words, ``paired 95% CI of the difference [lo, hi]`` ("" without one)."""
    if d.get("ci") is None:
        return ""
    lo, hi = d["ci"]
    return f"paired 95% CI of the difference [{lo:{fmt}}, {hi:{fmt}}]"


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
        "notes": _notes(cfg),
        "recipes": list(cfg.recipes),
        "seeds": list(cfg.seeds),
    }
