"""Old import paths of marginlab, kept working for one release with a :class:`DeprecationWarning`.

marginlab 0.2 arranged its modules in layers (``marginlab.base``, ``marginlab.core``, ``marginlab.nets``
...; see ``docs/architecture.md``). Code written against 0.1 (``import marginlab.linear``,
``from marginlab.runner import run_experiment``) still imports: a finder on ``sys.meta_path`` serves each
old module name as the module that now holds it, and warns once per name. This module is the one table
of what moved where; nothing inside marginlab imports an old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

# old module -> the module that holds its contents now
MOVED_MODULES: dict[str, str] = {
    "marginlab.errors": "marginlab.base.errors",
    "marginlab.registry": "marginlab.base.registry",
    "marginlab.fsio": "marginlab.base.fsio",
    "marginlab.logs": "marginlab.base.logs",
    "marginlab.seed": "marginlab.base.seed",
    "marginlab.config": "marginlab.base.config",
    "marginlab.distributed": "marginlab.base.distributed",
    "marginlab.inputs": "marginlab.base.inputs",
    "marginlab.report.tables": "marginlab.base.tables",
    "marginlab.linear": "marginlab.core.linear",
    "marginlab.svm": "marginlab.core.svm",
    "marginlab.logistic": "marginlab.core.logistic",
    "marginlab.models": "marginlab.nets.models",
    "marginlab.weights": "marginlab.nets.weights",
    "marginlab.model_io": "marginlab.nets.loading",
    "marginlab.bracket": "marginlab.estimators.bracket",
    "marginlab.runs": "marginlab.lab.runs",
    "marginlab.runner": "marginlab.experiments",
    "marginlab.provenance": "marginlab.lab.provenance",
    "marginlab.sweep.workers": "marginlab.lab.workers",
    "marginlab.sweep.stopping": "marginlab.lab.stopping",
    "marginlab.train": "marginlab.training.loop",
    "marginlab.regularizers": "marginlab.training.regularizers",
    "marginlab.tracking": "marginlab.training.tracking",
    "marginlab.trends": "marginlab.training.trends",
    "marginlab.checkpoint": "marginlab.training.checkpoint",
    "marginlab.progress": "marginlab.training.progress",
}

# (old package, name) -> "new.module:name", for names that left a package that still exists
MOVED_NAMES: dict[tuple[str, str], str] = {
    ("marginlab.robustness", "plot_robustness"): "marginlab.plots.robustness:plot_robustness",
    ("marginlab.sweep", "MANIFEST"): "marginlab.lab.names:SWEEP_MANIFEST",
    ("marginlab.sweep", "TABLE_CSV"): "marginlab.lab.names:SWEEP_CSV",
    ("marginlab.sweep", "TABLE_MD"): "marginlab.lab.names:SWEEP_MD",
    ("marginlab.report", "HTML_NAME"): "marginlab.lab.names:REPORT_HTML",
    ("marginlab.report", "MD_NAME"): "marginlab.lab.names:REPORT_MD",
    ("marginlab.report", "FIGURE_COPIES"): "marginlab.lab.names:REPORT_FIGURES",
    ("marginlab.report.collect", "TABLE_FILES"): "marginlab.lab.names:RESULT_TABLES",
    ("marginlab.training.progress", "TENSORBOARD_DIR"): "marginlab.lab.names:TENSORBOARD",
    ("marginlab.training.checkpoint", "Checkpoint"): "marginlab.training.checkpoint:TrainingState",
    # the recipes and reference values left the loss terms' module
    **{
        ("marginlab.training.regularizers", name): f"marginlab.training.recipes:{name}"
        for name in (
            "RECIPES",
            "RegularizerConfig",
            "reference_gamma",
            "reference_lr",
            "resolve_config",
            "build_regularizers",
        )
    },
    # the module marginlab.bounds (0.1) is the package marginlab.bounds now
    **{
        ("marginlab.bounds", name): f"marginlab.bounds.{module}:{name}"
        for module, names in {
            "domain": ("DOMAINS", "InputSet", "parse_domain"),
            "ops": ("Shape", "Op", "Affine", "Dense", "Conv", "Scale", "Reshape", "ReLU", "MaxPool"),
            "network": ("SUPPORTED", "network_ops"),
            "crown": ("CROWN_BUDGET", "layer_bounds", "lower_bounds", "margin_spec"),
        }.items()
        for name in names
    },
    # marginlab.model_io (0.1) imports as marginlab.nets.loading; the names it does not use moved beside it
    ("marginlab.nets.loading", "KINDS"): "marginlab.nets.spec:KINDS",
    ("marginlab.nets.loading", "model_factory"): "marginlab.nets.usercode:model_factory",
    ("marginlab.nets.loading", "check_spec"): "marginlab.nets.usercode:check_spec",
    ("marginlab.nets.loading", "parse_preprocess"): "marginlab.nets.preprocess:parse_preprocess",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


class _Alias(importlib.abc.Loader):
    """Loads an old module name as the module that now holds its contents."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module is already imported."""


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the old module names of :data:`MOVED_MODULES` (and only those)."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        """A spec that loads ``fullname`` as its new module, or None for any other name."""
        new = MOVED_MODULES.get(fullname)
        if new is None or new == fullname:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder of old module names on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def moved_attribute(package: str, name: str) -> Any:
    """For a package's ``__getattr__``: the object an old ``package.name`` now is, with a warning;
    AttributeError for names that never moved."""
    target = MOVED_NAMES.get((package, name))
    if target is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module, attr = target.split(":")
    _warn(f"{package}.{name}", f"{module}.{attr}")
    return getattr(importlib.import_module(module), attr)
