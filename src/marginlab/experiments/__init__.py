"""Experiment kinds that ``marginlab run`` can run, by the ``kind`` key of a config.

Each kind lives in its own module, which defines:

- ``Config``: a frozen dataclass (the TOML minus ``kind``),
- ``run(cfg: Config, rd: RunDir, *, resume: bool) -> dict``: does the work, logs metrics into ``rd``
  and returns the summary (the runner writes ``summary.json`` and then draws the figures),
- ``plot(run_dir: Path) -> list[Path]``: redraws every figure from the run directory's files alone.

Modules are imported lazily so that ``marginlab --help`` stays fast.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from marginlab.errors import ConfigError

EXPERIMENTS: dict[str, str] = {
    "logreg-gd": "marginlab.experiments.logreg_gd",  # the poster's motivating example
    "train": "marginlab.experiments.deep",  # SGD training of deep models with margin tracking
    "compare": "marginlab.experiments.compare",  # standard vs constraint vs regularized
}


def get_experiment(kind: object) -> ModuleType:
    """The module implementing experiment ``kind``; unknown kinds raise :class:`ConfigError`."""
    if not isinstance(kind, str) or kind not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment kind {kind!r}; set kind = one of: {', '.join(sorted(EXPERIMENTS))}"
        )
    return importlib.import_module(EXPERIMENTS[kind])
