"""Read what a report shows from run directories: config, summary, metrics, figures, tables.

Policy for incomplete runs: a directory without a readable ``config.json`` (or with a corrupt
``summary.json`` or ``metrics.jsonl``) is not a run and raises a one-line :class:`RunDirError`. A run
without ``summary.json`` is *unfinished* (still training, killed, or failed); it is included in the
report with a visible "unfinished" mark, so a report can follow a sweep that is still running. A sweep
directory (written by ``marginlab sweep``) given in place of a run stands for all of its runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marginlab.errors import ConfigError, RunDirError
from marginlab.fsio import read_json
from marginlab.runs import (
    CONFIG,
    FIGURES,
    SUMMARY,
    SWEEP_MANIFEST,
    TABLE_CSV,
    TABLE_MD,
    read_config,
    read_metrics,
)

# Results tables written by experiments that compare several models; the CSV is preferred when both
# exist (they hold the same numbers, and the CSV renders as a real table).
TABLE_FILES = (TABLE_CSV, TABLE_MD)


@dataclass(frozen=True)
class RunInfo:
    """Everything a report shows about one run directory."""

    path: Path  # as given by the user
    label: str  # short name, unique within one report
    config: dict[str, Any]
    summary: dict[str, Any] | None  # None: the run is unfinished
    metrics: list[dict[str, Any]]
    figures: list[Path]  # every PNG under figures/, then those at the top of the run directory, sorted
    tables: list[Path]  # table.csv, else table.md, at the top of the run directory (or nothing)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", "?"))


def load_runs(paths: Sequence[str | Path]) -> list[RunInfo]:
    """Load every run directory (duplicates dropped, order kept) and give each a unique short label."""
    if not paths:
        raise ConfigError("give at least one run directory to report on")
    unique: dict[Path, Path] = {}
    for p in (run for given in paths for run in expand_sweep(Path(given))):
        unique.setdefault(p.resolve(), p)
    labels = unique_labels(list(unique))
    return [_load_run(given, label) for given, label in zip(unique.values(), labels, strict=True)]


def expand_sweep(path: Path) -> list[Path]:
    """A sweep directory (``sweep.json``, no ``config.json``) stands for its runs; others for themselves."""
    manifest = path / SWEEP_MANIFEST
    if (path / CONFIG).is_file() or not manifest.is_file():
        return [path]
    try:
        names = [run["name"] for run in read_json(manifest)["runs"]]
    except (ValueError, KeyError, TypeError):
        raise RunDirError(f"{manifest} is corrupt (not a marginlab sweep manifest)") from None
    # Only direct children: a manifest must not send the report elsewhere ("../x", "/etc").
    inside = [name for name in names if isinstance(name, str) and Path(name).name == name != ".."]
    runs = [path / name for name in inside if (path / name / CONFIG).is_file()]
    if not runs:
        raise RunDirError(f"sweep {path} has no runs yet")
    return runs


def _load_run(path: Path, label: str) -> RunInfo:
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory (expected a marginlab run directory)")
    if not (path / CONFIG).is_file():
        raise RunDirError(f"{path} is not a marginlab run directory (no {CONFIG})")
    config = read_config(path)
    if not isinstance(config, dict):
        raise RunDirError(f"{path / CONFIG} is corrupt (not a JSON object)")
    summary = _read_summary(path)
    try:
        metrics = [r for r in read_metrics(path) if isinstance(r, dict)]
    except ValueError:
        raise RunDirError(f"{path / 'metrics.jsonl'} is corrupt (a line is not valid JSON)") from None
    figures_dir = path / FIGURES
    figures = sorted(figures_dir.rglob("*.png")) if figures_dir.is_dir() else []
    # and figures other commands wrote beside the run's files (``marginlab margins --out run/b.csv`` draws
    # ``run/b.bracket.png``)
    figures += sorted(path.glob("*.png"))
    tables = [path / name for name in TABLE_FILES if (path / name).is_file()][:1]
    return RunInfo(path, label, config, summary, metrics, figures, tables)


def _read_summary(path: Path) -> dict[str, Any] | None:
    file = path / SUMMARY
    if not file.is_file():
        return None
    try:
        summary = read_json(file)
    except ValueError:
        raise RunDirError(f"{file} is corrupt (not valid JSON)") from None
    if not isinstance(summary, dict):
        raise RunDirError(f"{file} is corrupt (not a JSON object)")
    return summary


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the paths apart (``sweepA/seed=0``)."""
    parts = [p.parts for p in paths]
    depth = 1
    while True:
        labels = ["/".join(pp[-depth:]) for pp in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(pp) for pp in parts):
            return labels
        depth += 1
