"""Experiment kinds that ``marginlab run`` can run, by the ``kind`` key of a config.

Each kind lives in its own module, which satisfies :class:`marginlab.lab.runner.Experiment`:

- ``Config``: a frozen dataclass (the TOML minus ``kind``),
- ``run(cfg: Config, rd: RunDir, *, resume: bool) -> dict``: does the work, logs metrics into ``rd``
  and returns the summary (the runner writes ``summary.json`` and then draws the figures),
- ``plot(run_dir: Path) -> list[Path]``: redraws every figure from the run directory's files alone.

Importing this package registers every kind with the runner; the runner's entry points are
re-exported here, so callers above this layer (commands, sweeps) run experiments through this package.
"""

from __future__ import annotations

from marginlab.experiments import compare, deep, logreg_gd
from marginlab.lab.runner import (
    EXPERIMENTS,
    Experiment,
    Mode,
    build_config,
    config_record,
    get_experiment,
    plan,
    plan_mode,
    plot_run,
    register_experiment,
    resume_experiment,
    run_experiment,
    run_or_resume,
)

register_experiment("logreg-gd", logreg_gd)  # the poster's motivating example
register_experiment("train", deep)  # SGD training of deep models with margin tracking
register_experiment("compare", compare)  # standard vs constraint vs regularized

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "Mode",
    "build_config",
    "config_record",
    "get_experiment",
    "plan",
    "plan_mode",
    "plot_run",
    "resume_experiment",
    "run_experiment",
    "run_or_resume",
]
