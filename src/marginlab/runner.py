"""Run an experiment config into a run directory, or resume one; redraw its figures."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from marginlab.config import from_dict, to_dict
from marginlab.distributed import is_main_process
from marginlab.errors import ConfigError, RunDirError
from marginlab.experiments import get_experiment
from marginlab.runs import RunDir, read_config

log = logging.getLogger(__name__)


def build_config(raw: dict[str, Any]) -> tuple[str, Any]:
    """Split ``kind`` off a raw config dict and build that experiment's frozen Config."""
    raw = dict(raw)
    kind = raw.pop("kind", None)
    if kind is None:
        raise ConfigError("config has no 'kind' key (e.g. kind = \"logreg-gd\")")
    exp = get_experiment(kind)
    return kind, from_dict(exp.Config, raw)


def run_experiment(raw: dict[str, Any], out: str | Path, *, force: bool = False) -> Path:
    """Validate ``raw``, create the run directory ``out`` and run the experiment to completion."""
    kind, cfg = build_config(raw)
    if not is_main_process():  # a torchrun worker: it trains, rank 0 alone creates and writes `out`
        return _execute_worker(kind, cfg, RunDir(out), resume=False)
    rd = RunDir.create(out, {"kind": kind, **to_dict(cfg)}, force=force)
    try:
        return _execute(kind, cfg, rd, resume=False)
    except BaseException:
        # A run that failed (or was interrupted) before its first checkpoint has nothing worth
        # resuming: remove it rather than leave a half-made run directory behind.
        if not rd.checkpoint.exists() and not rd.finished:
            shutil.rmtree(rd.path, ignore_errors=True)
        raise


def resume_experiment(path: str | Path) -> Path:
    """Continue an unfinished run from its last checkpoint (its config is read from the directory)."""
    rd = RunDir.open(path)
    if rd.finished:
        raise RunDirError(f"{rd.path} is already finished; nothing to resume")
    kind, cfg = build_config(read_config(rd.path))
    if not is_main_process():
        return _execute_worker(kind, cfg, rd, resume=True)
    rd.lock()
    return _execute(kind, cfg, rd, resume=True)


def _execute_worker(kind: str, cfg: Any, rd: RunDir, *, resume: bool) -> Path:
    """Ranks > 0 of a data-parallel run: take part in training, never lock or write the directory."""
    get_experiment(kind).run(cfg, rd, resume=resume)
    return rd.path


def _execute(kind: str, cfg: Any, rd: RunDir, *, resume: bool) -> Path:
    exp = get_experiment(kind)
    try:
        summary = exp.run(cfg, rd, resume=resume)
        # The summary marks the run finished; it is written before the figures so that a plotting
        # problem can never lose a finished run (``marginlab plot`` redraws them).
        rd.write_summary({"kind": kind, **summary})
        exp.plot(rd.path)
    finally:
        rd.unlock()
    return rd.path


def plot_run(path: str | Path) -> list[Path]:
    """Redraw every figure of a run directory from its files alone."""
    rd = RunDir.open(path)
    kind = read_config(rd.path).get("kind")
    return list(get_experiment(kind).plot(rd.path))
