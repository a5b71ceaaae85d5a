"""Static checks of the source tree: the type checker passes, and public definitions carry docstrings.

mypy reads its settings from `[tool.mypy]` in pyproject.toml (the files, the strictness, the per-module
allowances for untyped third-party libraries), so `mypy` from the repository root and this test agree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from marginlab.core.stats import margin_stats
from marginlab.training.records import BoundSummary, MarginSummary, margin_summary

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "marginlab"


def test_mypy_finds_no_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """mypy over src/marginlab, configured by pyproject.toml, reports no error."""
    api = pytest.importorskip("mypy.api")
    # mypy finds pyproject.toml, and the `files` it names, relative to the working directory
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = api.run(["--no-error-summary", "--no-pretty", "--no-color-output"])
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert status == 0 and not errors, (
        f"mypy found {len(errors)} error(s) (exit status {status}):\n{stdout}{stderr}"
    )


def _public(name: str) -> bool:
    return not name.startswith("_")


def _undocumented(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, qualified name) of each public module-level function or class and public method without one.

    Methods count when their class is public; nested functions and dunder methods are not checked.
    """
    missing: list[tuple[int, str]] = []
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if not isinstance(node, defs) or not _public(node.name):
            continue
        if ast.get_docstring(node) is None:
            missing.append((node.lineno, node.name))
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (
                    isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and _public(item.name)
                    and ast.get_docstring(item) is None
                ):
                    missing.append((item.lineno, f"{node.name}.{item.name}"))
    return missing


def undocumented_definitions(paths: list[Path]) -> list[str]:
    """`file:line name` for every public definition without a docstring in `paths`."""
    out = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(ROOT).as_posix()
        out += [f"{rel}:{line} {name}" for line, name in _undocumented(tree)]
    return out


def test_public_definitions_have_docstrings() -> None:
    """Every public function, class and method of every module of src/marginlab has a docstring."""
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 100, f"found only {len(paths)} modules under {PACKAGE}"
    missing = undocumented_definitions(paths)
    assert not missing, f"{len(missing)} public definition(s) without a docstring:\n" + "\n".join(missing)


def test_docstring_walker_finds_what_it_should() -> None:
    """The walker flags a bare public function, class and method, and nothing private or documented."""
    src = '''
def bare(): pass
def _private(): pass
def documented():
    """Yes."""
class Bare:
    def method(self): pass
    def _hidden(self): pass
    def __init__(self): pass
class _Private:
    def method(self): pass
class Documented:
    """Yes."""
    def method(self):
        """Yes."""
'''
    found = [name for _, name in _undocumented(ast.parse(src))]
    assert found == ["bare", "Bare", "Bare.method"]


def test_margin_summary_has_exactly_the_typed_keys() -> None:
    """The one record built by a cast: margin_summary must give MarginSummary's keys, in declared order
    (the order JSON files keep), and BoundSummary adds only ``n``."""
    m = torch.tensor([-0.5, 0.1, 0.2, 0.7, float("inf")], dtype=torch.float64)
    summary = margin_summary("estimate", m)
    assert list(summary) == list(MarginSummary.__annotations__)
    assert list(summary)[1:] == list(margin_stats(m))
    assert set(BoundSummary.__annotations__) - set(MarginSummary.__annotations__) == {"n"}
