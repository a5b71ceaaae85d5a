"""Readers of run directories: every file of :mod:`marginlab.lab.names` is read back through here.

Policy: a missing file that a finished run must hold, or a damaged one, raises a one-line
:class:`~marginlab.base.errors.RunDirError` naming the file. A file that may legitimately be absent (the
summary of an unfinished run, the SVMs of a run that has not computed them) has a reader returning
``None`` for it. The per-point margins table of ``marginlab margins`` is read by
:func:`marginlab.lab.margins_table.read_columns`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from marginlab.base.errors import RunDirError
from marginlab.base.fsio import read_json, read_jsonl, read_npz
from marginlab.lab.names import (
    ADV_IMAGES,
    CONFIG,
    EPOCH_GLOB,
    FIGURE_SUFFIX,
    FIGURES,
    MARGINS,
    METRICS,
    RESULT_TABLES,
    ROBUSTNESS,
    SUMMARY,
    SVM,
    SWEEP_MANIFEST,
    epoch_of,
)
from marginlab.robustness.evaluate import RobustnessResult

__all__ = [
    "figure_files",
    "is_run_dir",
    "margins_files",
    "read_adv_images",
    "read_config",
    "read_margins_file",
    "read_metrics",
    "read_robustness",
    "read_robustness_extra",
    "read_summary",
    "read_summary_if_any",
    "read_svm",
    "read_sweep_runs",
    "result_tables",
]


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a marginlab run (its ``config.json``)."""
    return (Path(path) / CONFIG).is_file()


def read_config(path: str | Path) -> dict[str, Any]:
    """The resolved config of the run in ``path`` (``config.json``: a JSON object with a ``kind``)."""
    cfg = _read(Path(path) / CONFIG)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("kind"), str):
        raise RunDirError(f"{Path(path) / CONFIG} is not a marginlab config (a JSON object with a 'kind')")
    return cfg


def read_summary(path: str | Path) -> dict[str, Any]:
    """The summary of the finished run in ``path``; a missing or corrupt ``summary.json`` is an error."""
    summary = _read(Path(path) / SUMMARY)
    if not isinstance(summary, dict):
        raise RunDirError(f"{Path(path) / SUMMARY} is corrupt (not a JSON object)")
    return summary


def read_summary_if_any(path: str | Path) -> dict[str, Any] | None:
    """The summary of the run in ``path``, or None while it is unfinished (no ``summary.json``); a
    corrupt one is an error (:func:`read_summary`)."""
    return read_summary(path) if (Path(path) / SUMMARY).is_file() else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a torn last line is dropped; a damaged line elsewhere names
    the file and line)."""
    file = Path(path) / METRICS
    try:
        records = read_jsonl(file)
    except ValueError as e:
        raise RunDirError(f"{file} is corrupt: {e}") from None
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise RunDirError(f"{file} is corrupt: record {i} is not a JSON object")
    return records


def margins_files(run_dir: str | Path) -> dict[int, Path]:
    """Every per-point margins file of a run directory, by epoch (sorted)."""
    out = {}
    for path in (Path(run_dir) / MARGINS).glob(EPOCH_GLOB):
        epoch = epoch_of(path)
        if epoch is not None:
            out[epoch] = path
    return dict(sorted(out.items()))


def read_margins_file(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of one per-point margins file (``margins/epoch-XXXX.npz``), by its key
    (``"train/first-order"`` ``[n]``, ``"epoch"``...)."""
    return read_npz(path)


def read_svm(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The SVMs of a ``logreg-gd`` run (``svm.npz``: ``free_margin``, ``regularized_margin``, their
    ``(w, b)``...), or None before they are computed."""
    path = Path(run_dir) / SVM
    return read_npz(path) if path.is_file() else None


def read_adv_images(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The fixed test images of a ``logreg-gd`` run (``adv_images.npz``: ``x [k, C, H, W]``, ``y [k]``),
    or None when the run keeps none."""
    path = Path(run_dir) / ADV_IMAGES
    return read_npz(path) if path.is_file() else None


def read_robustness(run_dir: str | Path) -> RobustnessResult:
    """The robustness result saved in ``run_dir`` (``robustness.json``), by
    :meth:`~marginlab.robustness.RobustnessResult.load`; missing or damaged: :class:`RunDirError`."""
    return RobustnessResult.load(Path(run_dir) / ROBUSTNESS)


def read_robustness_extra(run_dir: str | Path) -> dict[str, Any]:
    """What was saved beside the result in ``robustness.json`` (``reference_eps`` of a comparison's
    sub-run; ``written_by``, ``model``, ``weights``, ``data``, ``split`` of ``marginlab robustness``)."""
    path = Path(run_dir) / ROBUSTNESS
    raw = _read(path)
    if not isinstance(raw, dict):
        raise RunDirError(f"{path} is not a robustness result")
    fields = {f.name for f in dataclasses.fields(RobustnessResult)}
    return {k: v for k, v in raw.items() if k not in fields}


def read_sweep_runs(path: str | Path) -> list[str] | None:
    """The run names listed by the manifest of the sweep in ``path`` (``sweep.json``), or None when
    ``path`` is not a sweep directory (a run directory, or no manifest)."""
    path = Path(path)
    manifest = path / SWEEP_MANIFEST
    if is_run_dir(path) or not manifest.is_file():
        return None
    try:
        return [run["name"] for run in read_json(manifest)["runs"]]
    except (ValueError, KeyError, TypeError):
        raise RunDirError(f"{manifest} is corrupt (not a marginlab sweep manifest)") from None


def figure_files(run_dir: str | Path) -> list[Path]:
    """Every figure under ``figures/``, then those at the top of the run directory (written beside its
    files by the commands that evaluate a model), each group sorted."""
    run_dir = Path(run_dir)
    figures_dir = run_dir / FIGURES
    pattern = f"*{FIGURE_SUFFIX}"
    figures = sorted(figures_dir.rglob(pattern)) if figures_dir.is_dir() else []
    return figures + sorted(run_dir.glob(pattern))


def result_tables(run_dir: str | Path) -> list[Path]:
    """The results table of an experiment that compares models: ``table.csv``, else ``table.md``, at the
    top of the run directory (or nothing)."""
    run_dir = Path(run_dir)
    return [run_dir / name for name in RESULT_TABLES if (run_dir / name).is_file()][:1]


def _read(file: Path) -> Any:
    if not file.is_file():
        raise RunDirError(f"{file.parent} is not a complete run directory: {file.name} is missing")
    try:
        return read_json(file)
    except (ValueError, UnicodeDecodeError):
        raise RunDirError(f"{file} is corrupt (not valid JSON)") from None
