"""The tables of a ``compare`` run, from the rows of :func:`marginlab.experiments.compare_results.collect`.

- ``table.csv``: one row per base × recipe (seed-averaged): clean accuracy, last-epoch min/mean margins,
  robust accuracy at the reference eps (bound share, the first attack's own figure, AutoAttack, then the
  band: certified accuracy beside the worst case) and the sweep as ``;``-joined columns;
- ``sweep.csv``: the same robustness numbers, one row per base × recipe × eps;
- ``table.md``: the notes on how the numbers were obtained (:func:`notes`), the headline table, per base
  the recipes side by side with their changes against ``standard``, the training cost and the ablations
  (:mod:`marginlab.experiments.compare_sidebyside`, given the summary), the sweep table and every
  sanity-check warning.

The verdicts (each recipe against ``standard``) are :mod:`marginlab.experiments.compare_verdicts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marginlab.base.fsio import atomic_write_text
from marginlab.base.tables import csv_text, format_cell, markdown_table
from marginlab.experiments.compare_config import Config
from marginlab.experiments.compare_results import POINT_STATS, Row, collect, metric_key
from marginlab.experiments.compare_sidebyside import side_by_side
from marginlab.lab.names import ROBUSTNESS, SWEEP_CSV, TABLE_CSV, TABLE_MD

# fmt: off
HEADLINE = ["base", "model", "dataset", "recipe", "seeds", "epochs", "lr", "clean_acc", "margin_estimator",
            "train_min_margin", "train_mean_margin", "test_min_margin", "test_mean_margin", "eps_ref",
            "bound@ref", "pgd@ref", "autoattack@ref", "certified@ref", "worst@ref"]
# fmt: on
# table.csv only (table.md shows them side by side per base): the fixed points' margins. The training
# cost is in table.md and summary.json (under ``time``) only: this file is the same in every run of a seed.
EXTRA = [
    "margin_bound",
    *[f"upper_{k}" for k in POINT_STATS],
    "certifier",
    *[f"lower_{k}" for k in POINT_STATS],
]  # fmt: skip


def _headline(row: Row) -> list[Any]:
    """The ``table.csv`` line of a row: the :data:`HEADLINE` columns (``@ref`` at the row's reference eps),
    then the sweep's radii, the first attack's, the certified and the worst-case robust accuracy,
    ``;``-joined."""
    ref = f"{row['eps_ref']:g}"
    vals = {k: row.get(k.replace("@ref", f"@{ref}")) for k in HEADLINE}
    sweep = [row.get(metric_key("worst", e)) for e in row["eps"]]
    first = [row.get(metric_key(row["first_attack"], e)) for e in row["eps"]]
    certified = [row.get(metric_key("certified", e)) for e in row["eps"]]
    return [vals[k] for k in HEADLINE] + [
        ";".join(f"{e:g}" for e in row["eps"]),
        ";".join(format_cell(v) for v in first),
        ";".join(format_cell(v) for v in certified),
        ";".join(format_cell(v) for v in sweep),
    ]


def write_tables(
    cfg: Config, run_dir: Path, rows: list[Row] | None = None, summary: dict[str, Any] | None = None
) -> None:
    """``table.csv`` (one row per base × recipe), ``sweep.csv`` (tidy, per radius) and ``table.md``;
    ``rows``: :func:`collect`'s when already read; ``summary``: the verdicts, for the side-by-side
    tables (left out without it)."""
    rows = collect(cfg, run_dir) if rows is None else rows
    first = cfg.robustness.settings_for(1.0).attacks[0]
    header = [*HEADLINE, "sweep_eps", f"sweep_{first}", "sweep_certified", "sweep_worst", *EXTRA]
    lines = [_headline(r) + [r.get(k) for k in EXTRA] for r in rows]
    atomic_write_text(run_dir / TABLE_CSV, csv_text(header, lines))
    tidy = [
        [
            r["base"],
            r["recipe"],
            e,
            r.get(metric_key("bound", e)),
            r.get(metric_key("pgd", e)),
            r.get(metric_key("autoattack", e)),
            r.get(metric_key("certified", e)),
            r.get(metric_key("worst", e)),
        ]
        for r in rows
        for e in r["eps"]
    ]
    atomic_write_text(
        run_dir / SWEEP_CSV,
        csv_text(["base", "recipe", "eps", "bound", "pgd", "autoattack", "certified", "worst"], tidy),
    )
    md = [
        f"# Regularizer comparison\n\n{notes(cfg)}\n",
        "## Headline (reference eps)\n",
        markdown_table(HEADLINE, [[format_cell(v) for v in _headline(r)[: len(HEADLINE)]] for r in rows]),
    ]
    for base in cfg.bases:
        mine = [r for r in rows if r["base"] == base.name]
        eps = mine[0]["eps"]
        if summary is not None and base.name in summary.get("bases", {}):
            md += side_by_side(base.name, mine, summary["bases"][base.name])
        md += [
            f"\n## {base.name}: robust accuracy vs eps (first attack alone / certified / worst case)\n",
            markdown_table(
                ["recipe", *[f"eps={e:g}" for e in eps]],
                [
                    [
                        r["recipe"],
                        *[
                            f"{format_cell(r.get(metric_key(r['first_attack'], e)))} / "
                            f"{format_cell(r.get(metric_key('certified', e)))} / "
                            f"{format_cell(r.get(metric_key('worst', e)))}"
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


def notes(cfg: Config) -> str:
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
            "`worst`: the reported robust accuracy (survived every evaluation; an upper bound).",
            _certified_note(s.certify),
            "Margins: the last epoch's tracked estimate, min and mean over the tracked subsets; and the "
            "min-norm bound (`bound`) and certified radius of the fixed test points (`upper_*`, `lower_*`: "
            "min, quartiles, mean of the finite values).",
            "Training cost: wall and CPU seconds of the training epochs (margin tracking left out), and "
            "their ratio to `standard` of the same seed (geometric mean over seeds, 95% interval).",
            f"Seeds {list(cfg.seeds)}, numbers averaged over seeds.",
        ]
    )


def _certified_note(certify: str | None) -> str:
    """The sentence of :func:`notes` on the ``certified`` columns."""
    if certify in (None, "off"):
        return "No certificates (`certified` empty)."
    by = (
        "CROWN over the R^d ball, sound for the box, with interval bounds on the hidden layers of "
        "convolutional nets, where bound propagation supports the model"
        if certify == "auto"
        else f"{certify}, in the domain each model's {ROBUSTNESS} records"
    )
    return (
        f"`certified`: share of points whose certified margin lower bound ({by}) is at least "
        "eps, a lower bound; the true robust accuracy lies between `certified` and `worst`. No attack "
        "runs on a certified point."
    )
