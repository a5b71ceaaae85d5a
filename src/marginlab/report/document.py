"""The content of a report as a list of format-neutral blocks, rendered later to HTML and Markdown.

Building the content once and rendering it twice keeps ``report.html`` and ``report.md`` in step: both
show the same headings, tables, configs and figures, in the same order. Block text is raw (unescaped)
file content; each renderer escapes it for its own format.

Order (what a reader wants first comes first):

1. **Findings**: each run's checked claims as sentences, with the verdict and the numbers behind it, and
   a comparison's figures of the recipes side by side (:data:`FINDINGS_FIGURES`);
2. **Headline figures**: margins over epochs, then robustness curves, then margin brackets;
3. the runs at a glance and, for several runs, a comparison (shared summary keys; config keys that
   differ, and nothing else);
4. one section per run: compact summary tables (train and test side by side), the experiment's own
   sentences and definitions, a few metrics records, result tables, the other figures, the config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from marginlab.base.tables import (
    MISSING,
    flatten,
    format_cell,
    read_csv,
    scalar_items,
    shared_keys,
    split_pivot,
    union_keys,
)
from marginlab.lab.names import (
    CONFIG,
    FIGURES,
    METRICS,
    PARETO_FIGURE,
    POINT_MARGINS_FIGURE,
    ROBUSTNESS_BAND_FIGURE,
    SUMMARY,
    TABLE_MD,
)
from marginlab.report.blocks import Block, Bullets, Claims, Code, Figure, Heading, Table, Text
from marginlab.report.claims import claims_of
from marginlab.report.collect import RunInfo

MAX_METRIC_ROWS = 6  # evenly spaced records, first and last included
MAX_METRIC_COLUMNS = 10
FINDINGS_ID = "findings"
# Summary entries that are text for people, shown as sentences rather than table rows.
PROSE_KEYS = ("findings", "definitions", "notes")

# Figures in the order a reader wants them: (category, what the figure shows). A figure's category is the
# first whose word occurs in its file name; the first three categories are the headline figures.
FIGURE_ORDER = (
    ("margin", "margins over epochs"),
    ("robustness", "robust accuracy vs ε"),
    ("bracket", "margin brackets: certified lower bound to attack upper bound"),
    ("histogram", "margin histograms"),
    ("loss", "loss and accuracy (or error) over epochs"),
    ("cosine", "direction of gradient descent vs the SVM's"),
    ("adversarial", "minimal adversarial examples"),
)
HEADLINE = 3
# Figures shown under their run's findings (what a reader looks at first), with what each shows.
FINDINGS_FIGURES = {
    PARETO_FIGURE: "robust vs clean accuracy per recipe (marker area: training time; bars: 95% intervals)",
    POINT_MARGINS_FIGURE: "margin histograms per recipe, fixed test points (attack and certified bounds)",
    ROBUSTNESS_BAND_FIGURE: "robust accuracy vs ε per recipe with the certified band",
}


def build_document(runs: Sequence[RunInfo], title: str) -> list[Block]:
    """All blocks of a report on ``runs`` in reading order (see the module docstring)."""
    figures = {run.label: _figures(run) for run in runs}
    order = list(FINDINGS_FIGURES)
    shown = {
        k: sorted((f for _, f in figs if f.path.name in order), key=lambda f: order.index(f.path.name))
        for k, figs in figures.items()
    }
    figures = {k: [(r, f) for r, f in figs if f not in shown[k]] for k, figs in figures.items()}
    blocks: list[Block] = [Heading(1, title), *_findings(runs, shown)]
    headline = [f for run in runs for rank, f in figures[run.label] if rank < HEADLINE]
    if headline:
        blocks += [Heading(2, "Headline figures"), *headline]
    blocks += _overview(runs)
    if len(runs) > 1:
        blocks += _comparison(runs)
    for run in runs:
        blocks += _run_section(run, [f for rank, f in figures[run.label] if rank >= HEADLINE])
    return blocks


# -- findings ------------------------------------------------------------------------------------------
def _findings(runs: Sequence[RunInfo], figures: dict[str, list[Figure]]) -> list[Block]:
    """Each run's claims, then its :data:`FINDINGS_FIGURES` (``figures``: per run label)."""
    blocks: list[Block] = [Heading(2, "Findings", FINDINGS_ID)]
    for run in runs:
        if len(runs) > 1:
            blocks.append(Heading(3, f"{run.label} ({run.kind})"))
        if run.summary is None:
            blocks.append(Text(f"{run.label} is unfinished: no {SUMMARY} yet, so nothing is checked", True))
            continue
        claims = claims_of(run.summary, run.kind, run.metrics)
        if claims:
            blocks.append(Claims(claims))
        else:
            blocks.append(Text(f"{run.label}: its {SUMMARY} states no findings; see its summary below."))
        if run.missing_figures:
            blocks.append(Text(missing_figures_note(run), True))
        blocks += [replace(f, description=FINDINGS_FIGURES[f.path.name]) for f in figures.get(run.label, [])]
    return blocks


def missing_figures_note(run: RunInfo) -> str:
    """The sentence that says which figures a finished run lacks on disk and how to redraw them."""
    names = ", ".join(f"{FIGURES}/{name}" for name in run.missing_figures)
    n = len(run.missing_figures)
    return (
        f"{run.label}: {n} figure{'s' if n > 1 else ''} the run's files call for {'are' if n > 1 else 'is'} "
        f"missing on disk: {names}; 'marginlab plot {run.path}' redraws them"
    )


# -- figures -------------------------------------------------------------------------------------------
def figure_rank(name: str) -> tuple[int, str]:
    """``(category, description)`` of a figure file name; unknown figures come last."""
    stem = Path(name).stem.lower()
    for rank, (word, description) in enumerate(FIGURE_ORDER):
        if word in stem and not (word == "margin" and "histogram" in stem):
            return rank, description
    return len(FIGURE_ORDER), ""


def _figures(run: RunInfo) -> list[tuple[int, Figure]]:
    """The run's figures in the fixed order of :data:`FIGURE_ORDER` (then by path), each with its rank."""
    figures_dir = run.path / FIGURES
    out = []
    for path in run.figures:
        caption = (
            path.relative_to(figures_dir) if path.is_relative_to(figures_dir) else path.relative_to(run.path)
        ).as_posix()
        rank, description = figure_rank(path.name)
        out.append((rank, Figure(path, caption, run.label, description)))
    return sorted(out, key=lambda rf: (rf[0], rf[1].caption))


# -- the runs together ---------------------------------------------------------------------------------
def _overview(runs: Sequence[RunInfo]) -> list[Block]:
    rows = [
        [r.label, r.kind, "finished" if r.finished else "UNFINISHED", _figure_count(r), str(r.path)]
        for r in runs
    ]
    return [Heading(2, "Runs"), Table(["run", "kind", "status", "figures", "directory"], rows)]


def _figure_count(run: RunInfo) -> str:
    """How many figures a run has, and how many it lacks (``3 (2 MISSING)``)."""
    missing = f" ({len(run.missing_figures)} MISSING)" if run.missing_figures else ""
    return f"{len(run.figures)}{missing}"


def _comparison(runs: Sequence[RunInfo]) -> list[Block]:
    """Side by side: the scalar summary keys all finished runs share, and the config keys that differ."""
    labels = [r.label for r in runs]
    blocks: list[Block] = [Heading(2, "Comparison")]
    summaries = [_summary_items(r.summary) if r.summary is not None else None for r in runs]
    finished = [s for s in summaries if s is not None]
    keys = shared_keys(finished)
    # keys with one value in every finished run are named once, so the table shows what tells runs apart
    same = [k for k in keys if len(finished) > 1 and len({json.dumps(s[k]) for s in finished}) == 1]
    differ = [k for k in keys if k not in same]
    if differ:
        rows = [[k] + [_cell(s.get(k)) if s is not None else MISSING for s in summaries] for k in differ]
        blocks += [Heading(3, "Summary (shared keys)"), Table(["key", *labels], rows)]
    if same:
        blocks.append(
            Text(
                "The same in every finished run: " + ", ".join(f"{k} = {_cell(finished[0][k])}" for k in same)
            )
        )
    if not keys:
        blocks.append(Text("No summary keys are shared by the finished runs."))
    blocks += _config_differences(runs)
    return blocks


def _config_differences(runs: Sequence[RunInfo]) -> list[Block]:
    """Keys every config has with values that differ, as a table; keys only some configs have, as a
    sentence per run (a table of them would be mostly dashes)."""
    labels = [r.label for r in runs]
    configs = [scalar_items(r.config) for r in runs]
    common = shared_keys(configs)
    differing = [k for k in common if len({json.dumps(c[k]) for c in configs}) > 1]
    blocks: list[Block] = [Heading(3, "Config differences")]
    if differing:
        blocks.append(Table(["key", *labels], [[k] + [_cell(c[k]) for c in configs] for k in differing]))
    elif len(common) == len(union_keys(configs)):
        blocks.append(Text("All runs have the same scalar config values."))
    else:
        blocks.append(Text("The keys all configs have hold the same values."))
    shared = set(common)
    only = [(label, [k for k in c if k not in shared]) for label, c in zip(labels, configs, strict=True)]
    kinds = sorted({r.kind for r in runs})
    if any(keys for _, keys in only):
        if len(kinds) > 1:
            blocks.append(
                Text(
                    f"The runs are of different kinds ({', '.join(kinds)}), so their configs differ in shape."
                )
            )
        blocks.append(Bullets([f"only {label} has: {', '.join(keys)}" for label, keys in only if keys]))
    return blocks


# -- one run -------------------------------------------------------------------------------------------
def _run_section(run: RunInfo, figures: list[Figure]) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"Run {run.label}"), Text(f"{run.kind} run in {run.path}")]
    if run.summary is None:
        blocks.append(Text(f"unfinished: this run has no {SUMMARY} (still running, killed or failed)", True))
    else:
        blocks += _summary(run.summary)
    blocks += _metrics(run)
    # a comparison's table.md holds what its CSV cannot: the recipes side by side with their intervals
    extra = [run.path / TABLE_MD] if run.kind == "compare" and (run.path / TABLE_MD).is_file() else []
    for table in dict.fromkeys([*run.tables, *extra]):
        blocks += _table_file(table)
    if figures:
        blocks += [Heading(3, "More figures"), *figures]
    blocks.append(Code(json.dumps(run.config, indent=2), "json", collapsed=f"{CONFIG} of {run.label}"))
    return blocks


def _summary_items(summary: dict[str, Any]) -> dict[str, Any]:
    """Every scalar of a summary (lists of records expanded), without its prose entries."""
    rest = {k: v for k, v in summary.items() if k not in PROSE_KEYS}
    return {k: v for k, v in flatten(rest, lists=True).items() if _shown(v)}


def _shown(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str | list)


def _cell(value: object) -> str:
    return format_cell(value, max_len=None)  # summaries are short; a reader needs every character


def _summary(summary: dict[str, Any]) -> list[Block]:
    """The summary as compact tables: one row per quantity with train and test (or, in a comparison, the
    recipes) side by side, and the remaining keys; then its sentences (findings, notes, warnings) and
    definitions as lists, never cut."""
    items = _summary_items(summary)
    prose = {k: v for k, v in items.items() if _is_sentences(v)}  # e.g. a comparison's warnings
    recipes = summary.get("recipes")
    columns = recipes if _is_sentences(recipes) and len(recipes) > 1 else ["train", "test"]
    rest, side_by_side = split_pivot({k: v for k, v in items.items() if k not in prose}, columns)
    blocks: list[Block] = [Heading(3, "Summary")]
    if rest:
        blocks.append(Table(["key", "value"], [[k, _cell(v)] for k, v in rest.items()]))
    if side_by_side:
        rows = [[k] + [_cell(v.get(c)) for c in columns] for k, v in side_by_side.items()]
        blocks += [Text(f"Side by side ({', '.join(columns)}):"), Table(["quantity", *columns], rows)]
    for key in PROSE_KEYS:
        value = summary.get(key)
        if isinstance(value, list) and value:
            title = "As the experiment states its findings" if key == "findings" else key.capitalize()
            blocks += [Heading(4, title), Bullets([str(v) for v in value])]
        elif isinstance(value, dict) and value:
            blocks += [Heading(4, key.capitalize()), Bullets([f"{k}: {v}" for k, v in value.items()])]
    for key, value in prose.items():
        blocks += [Heading(4, key), Bullets(list(value))]
    return blocks


def _is_sentences(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _metrics(run: RunInfo) -> list[Block]:
    """A few evenly spaced records (first and last included): scalar columns that change, margins and
    losses first; constant columns are named once in the note."""
    n = len(run.metrics)
    if n == 0:
        return [Heading(3, "Metrics"), Text("No metrics recorded.")]
    picks = sorted(set(np.linspace(0, n - 1, min(n, MAX_METRIC_ROWS)).round().astype(int).tolist()))
    records = [scalar_items(run.metrics[i]) for i in picks]
    columns = union_keys(records)
    constant = [c for c in columns if c != "epoch" and len({json.dumps(r.get(c)) for r in records}) == 1]
    varying = sorted((c for c in columns if c not in constant), key=_column_rank)
    note = f"{n} records in {METRICS}; showing {len(picks)}"
    if len(varying) > MAX_METRIC_COLUMNS:
        note += f" and {MAX_METRIC_COLUMNS} of {len(varying)} changing columns (all are in {METRICS})"
        varying = varying[:MAX_METRIC_COLUMNS]
    blocks: list[Block] = [Heading(3, "Metrics"), Text(note + ".")]
    blocks.append(Table(varying, [[format_cell(r.get(c)) for c in varying] for r in records]))
    if constant and len(picks) > 1:
        blocks.append(
            Text(
                "The same in every record shown: "
                + ", ".join(f"{c} = {format_cell(records[0].get(c))}" for c in constant)
            )
        )
    return blocks


def _column_rank(column: str) -> int:
    """Epoch first, then margins' min and mean, losses and accuracies, medians; the rest keep their order."""
    last = column.rsplit(".", 1)[-1]
    if column == "epoch":
        return 0
    if last in ("min", "mean"):
        return 1
    if any(word in last for word in ("loss", "acc", "error")):
        return 2
    return 3 if last == "median" else 4


def _table_file(path: Path) -> list[Block]:
    """A results table written by the experiment: CSV as a table, Markdown shown verbatim."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return [Heading(3, path.name), Text(f"could not read {path.name}: {e.strerror}", True)]
    if path.suffix == ".csv":
        header, rows = read_csv(text)
        if header:
            width = len(header)
            rows = [(row + [""] * width)[:width] for row in rows]  # ragged CSV lines stay rectangular
            return [Heading(3, path.name), Table(header, rows)]
    return [Heading(3, path.name), Code(text, "markdown" if path.suffix == ".md" else "")]
