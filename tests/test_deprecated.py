"""Old (0.1) import paths keep working, each with a DeprecationWarning naming its new home."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from marginlab.base.deprecated import MOVED_MODULES, MOVED_NAMES

# The flat modules of marginlab 0.1 (its src/marginlab/*.py, and the two that lived in sweep/ and report/):
# written out by hand, so that a module dropped from the table is noticed here.
OLD_MODULES = [
    "bounds", "bracket", "checkpoint", "config", "distributed", "errors", "fsio", "inputs", "linear",
    "logistic", "logs", "model_io", "models", "progress", "provenance", "registry", "regularizers", "runner",
    "runs", "seed", "svm", "tracking", "train", "trends", "weights", "sweep.workers", "sweep.stopping",
    "report.tables",
]  # fmt: skip


def test_every_old_module_has_a_new_home() -> None:
    # bounds was a module and is a package now: its old names are MOVED_NAMES of the package
    for name in OLD_MODULES:
        full = f"marginlab.{name}"
        assert full in MOVED_MODULES or name == "bounds", f"{full} has no new home in MOVED_MODULES"
    assert any(package == "marginlab.bounds" for package, _ in MOVED_NAMES)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_module_is_the_new_one_and_warns(old: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, old, raising=False)  # another test may have imported it already
    with pytest.warns(DeprecationWarning, match=MOVED_MODULES[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED_MODULES[old])


@pytest.mark.parametrize("key", sorted(MOVED_NAMES), ids=lambda k: f"{k[0]}.{k[1]}")
def test_old_name_resolves_to_its_new_home_and_warns(key: tuple[str, str]) -> None:
    package, name = key
    module_name, attr = MOVED_NAMES[key].split(":")
    with pytest.warns(DeprecationWarning, match=rf"{module_name}\.{attr}"):
        old = getattr(importlib.import_module(package), name)
    assert old is getattr(importlib.import_module(module_name), attr)


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    import marginlab.robustness

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        marginlab.robustness.nope  # noqa: B018


def test_old_style_code_runs_in_a_fresh_interpreter() -> None:
    # what a 0.1 user script does: import by the old paths, use the objects
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n"
        "    from marginlab.runner import run_experiment\n"
        "except DeprecationWarning as e:\n"
        "    print('warned:', e)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "from marginlab.runner import run_experiment\n"
        "from marginlab.linear import linear_margins\n"
        "from marginlab.experiments import run_experiment as new\n"
        "assert run_experiment is new and callable(linear_margins)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "warned: marginlab.runner is deprecated; use marginlab.experiments" in out and out.endswith("ok\n")


def test_new_code_imports_no_old_path() -> None:
    # marginlab itself never goes through the aliases: importing every command warns about nothing
    code = "import warnings; warnings.simplefilter('error', DeprecationWarning); import marginlab.cli"
    subprocess.run([sys.executable, "-c", code], check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        importlib.import_module("marginlab.cli")
