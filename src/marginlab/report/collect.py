"""Read what a report shows from run directories: config, summary, metrics, figures, tables.

Policy for incomplete runs: a directory without a readable ``config.json`` (or with a corrupt
``summary.json`` or ``metrics.jsonl``) is not a run and raises a one-line :class:`RunDirError`. A run
without ``summary.json`` is *unfinished* (still training, killed, or failed); it is included in the
report with a visible "unfinished" mark, so a report can follow a sweep that is still running. A sweep
directory (written by ``marginlab sweep``) given in place of a run stands for all of its runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marginlab.base.deprecated import moved_attribute
from marginlab.base.errors import ConfigError, MarginlabError, RunDirError
from marginlab.lab.names import CONFIG, FIGURES
from marginlab.lab.readers import (
    figure_files,
    is_run_dir,
    read_config,
    read_metrics,
    read_summary_if_any,
    read_sweep_runs,
    result_tables,
)
from marginlab.plots.compare import compare_figures
from marginlab.plots.logreg import logreg_figures
from marginlab.plots.training import training_figures

# Per experiment kind: the figures its plot draws from the run's files (names under figures/), so that a
# report can say which of them a finished run lacks on disk instead of silently showing fewer.
EXPECTED_FIGURES: dict[str, Callable[[Path], list[str]]] = {
    "train": training_figures,
    "logreg-gd": logreg_figures,
    "compare": compare_figures,
}


def __getattr__(name: str) -> Any:
    """The old ``TABLE_FILES`` (now ``marginlab.lab.names.RESULT_TABLES``), with a DeprecationWarning."""
    return moved_attribute(__name__, name)


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
    # figures the run's files say its plot draws (names under figures/) that are not on disk; only for a
    # finished run (an unfinished one draws its figures at the end)
    missing_figures: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        """Whether the run finished (it has a summary)."""
        return self.summary is not None

    @property
    def kind(self) -> str:
        """The experiment kind of the run's config (``"?"`` when it names none)."""
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
    names = read_sweep_runs(path)
    if names is None:
        return [path]
    # Only direct children: a manifest must not send the report elsewhere ("../x", "/etc").
    inside = [name for name in names if isinstance(name, str) and Path(name).name == name != ".."]
    runs = [path / name for name in inside if is_run_dir(path / name)]
    if not runs:
        raise RunDirError(f"sweep {path} has no runs yet")
    return runs


def _load_run(path: Path, label: str) -> RunInfo:
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory (expected a marginlab run directory)")
    if not is_run_dir(path):
        raise RunDirError(f"{path} is not a marginlab run directory (no {CONFIG})")
    config = read_config(path)
    summary = read_summary_if_any(path)
    metrics = read_metrics(path)
    figures = figure_files(path)
    missing = missing_figures(path, str(config.get("kind", "?")), figures) if summary is not None else ()
    return RunInfo(path, label, config, summary, metrics, figures, result_tables(path), missing)


def missing_figures(path: Path, kind: str, figures: Sequence[Path]) -> tuple[str, ...]:
    """The figures (names under ``figures/``) that the experiment ``kind`` draws from the files of the run
    in ``path`` but that are not among ``figures`` (empty for a kind whose figures are not known)."""
    expected = EXPECTED_FIGURES.get(kind)
    if expected is None:
        return ()
    try:
        names = expected(path)
    except (MarginlabError, KeyError, TypeError, ValueError):
        # files that cannot be read, or a config of another shape: nothing is expected, nothing claimed
        return ()
    present = {f.relative_to(path / FIGURES).as_posix() for f in figures if f.is_relative_to(path / FIGURES)}
    return tuple(name for name in names if name not in present)


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the paths apart (``sweepA/seed=0``)."""
    parts = [p.parts for p in paths]
    depth = 1
    while True:
        labels = ["/".join(pp[-depth:]) for pp in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(pp) for pp in parts):
            return labels
        depth += 1
