"""The content of a report as a list of format-neutral blocks, rendered later to HTML and Markdown.

Building the content once and rendering it twice keeps ``report.html`` and ``report.md`` in step: both
show the same headings, tables, configs and figures. Block text is raw (unescaped) file content; each
renderer escapes it for its own format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginlab.report.collect import RunInfo
from marginlab.report.tables import (
    MISSING,
    flatten,
    format_cell,
    read_csv,
    scalar_items,
    shared_keys,
    union_keys,
)
from marginlab.runs import FIGURES

MAX_METRIC_ROWS = 6  # evenly spaced records, first and last included
MAX_METRIC_COLUMNS = 12


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Text:
    text: str
    warning: bool = False  # drawn as a visible mark (e.g. an unfinished run)


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Code:
    text: str
    lang: str = ""
    collapsed: str | None = None  # a summary line: the block starts folded (HTML <details>)


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str
    run_label: str


Block = Heading | Text | Table | Code | Figure


def build_document(runs: Sequence[RunInfo], title: str) -> list[Block]:
    """All blocks of a report on ``runs``: overview, comparison (several runs), then one section per run."""
    blocks: list[Block] = [Heading(1, title), *_overview(runs)]
    if len(runs) > 1:
        blocks += _comparison(runs)
    for run in runs:
        blocks += _run_section(run)
    return blocks


def _overview(runs: Sequence[RunInfo]) -> list[Block]:
    rows = [
        [r.label, r.kind, "finished" if r.finished else "UNFINISHED", str(r.path), str(len(r.figures))]
        for r in runs
    ]
    return [Heading(2, "Runs"), Table(["run", "kind", "status", "directory", "figures"], rows)]


def _comparison(runs: Sequence[RunInfo]) -> list[Block]:
    """Side by side: the scalar summary keys all finished runs share, and the config keys that differ."""
    labels = [r.label for r in runs]
    blocks: list[Block] = [Heading(2, "Comparison")]
    summaries = [scalar_items(r.summary) if r.summary is not None else None for r in runs]
    finished = [s for s in summaries if s is not None]
    keys = shared_keys(finished)
    if keys:
        rows = [[k] + [format_cell(s.get(k)) if s is not None else MISSING for s in summaries] for k in keys]
        blocks += [Heading(3, "Summary (shared keys)"), Table(["key", *labels], rows)]
    else:
        blocks.append(Text("No summary keys are shared by the finished runs."))
    configs = [scalar_items(r.config) for r in runs]
    differing = [k for k in union_keys(configs) if len({json.dumps(c.get(k)) for c in configs}) > 1]
    if differing:
        rows = [[k] + [format_cell(c.get(k)) for c in configs] for k in differing]
        blocks += [Heading(3, "Config differences"), Table(["key", *labels], rows)]
    else:
        blocks.append(Text("All runs have the same scalar config values."))
    return blocks


def _run_section(run: RunInfo) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"Run {run.label}"), Text(f"{run.kind} run in {run.path}")]
    if run.summary is None:
        blocks.append(
            Text("unfinished: this run has no summary.json (still running, killed or failed)", True)
        )
    else:
        rows = [[k, format_cell(v)] for k, v in flatten(run.summary).items()]
        blocks += [Heading(3, "Summary"), Table(["key", "value"], rows)]
    blocks += _metrics(run)
    for table in run.tables:
        blocks += _table_file(table)
    blocks.append(Code(json.dumps(run.config, indent=2), "json", collapsed=f"config.json of {run.label}"))
    if run.figures:
        blocks.append(Heading(3, "Figures"))
        figures_dir = run.path / FIGURES
        blocks += [Figure(p, p.relative_to(figures_dir).as_posix(), run.label) for p in run.figures]
    return blocks


def _metrics(run: RunInfo) -> list[Block]:
    """A few evenly spaced metrics records (first and last included), scalar columns only."""
    n = len(run.metrics)
    if n == 0:
        return [Heading(3, "Metrics"), Text("No metrics recorded.")]
    picks = sorted(set(np.linspace(0, n - 1, min(n, MAX_METRIC_ROWS)).round().astype(int).tolist()))
    records = [scalar_items(run.metrics[i]) for i in picks]
    columns = union_keys(records)
    note = f"{n} records in metrics.jsonl; showing {len(picks)}"
    if len(columns) > MAX_METRIC_COLUMNS:
        note += f" and the first {MAX_METRIC_COLUMNS} of {len(columns)} columns"
        columns = columns[:MAX_METRIC_COLUMNS]
    rows = [[format_cell(r.get(c)) for c in columns] for r in records]
    return [Heading(3, "Metrics"), Text(note + "."), Table(columns, rows)]


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
