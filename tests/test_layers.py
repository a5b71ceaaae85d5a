"""The package's shape: the layers contract of ``pyproject.toml`` holds (import-linter), no import cycle
among marginlab's modules (grimp), marginlab's own modules imported at the top of files only (``ast``), and
the package graph in ``docs/architecture.md`` up to date (``scripts/package_graph.py --check``).

Each checker is also run on a small package built in ``tmp_path`` with an upward import, a cycle, a
function-local import and a ``TYPE_CHECKING`` import, to show that it reports them.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "marginlab"
SCRIPT = ROOT / "scripts" / "package_graph.py"


# -- the checkers ---------------------------------------------------------------------------------
def lint_imports(cwd: Path, path: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's ``lint-imports`` on the contracts of ``cwd/pyproject.toml``, run by this Python with
    ``path`` first on the module search path (so the source tree is checked, not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run(
        [sys.executable, "-c", code, "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def import_graph(package: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> grimp.ImportGraph:
    """grimp's graph of every import statement in ``package``, read from the sources under ``path``."""
    monkeypatch.syspath_prepend(str(path))
    return grimp.build_graph(package, cache_dir=None)


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One shortest cycle ``[a, b, ..., a]`` through the first module of every strongly connected component
    (Tarjan) of more than one module; ``[]`` when the graph is acyclic."""
    succ = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in succ:
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        inside = set(component)
        if len(component) == 1 and component[0] not in succ[component[0]]:
            continue
        start = component[0]
        parent: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parent:  # breadth-first, back to start
            nxt = []
            for v in frontier:
                for w in succ[v]:
                    if w in inside and w not in parent:
                        parent[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(path[::-1])
    return cycles


def describe_cycle(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    """``a -> b -> a`` with the line of each import."""
    steps = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        details = graph.get_import_details(importer=a, imported=b)
        where = f" (line {details[0]['line_number']}: {details[0]['line_contents']})" if details else ""
        steps.append(f"{a} -> {b}{where}")
    return "\n  ".join(steps)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, where: str = "module") -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement under ``node`` with where it runs: ``module`` (top level, also inside a
    module-level ``if``/``try``), ``function``, ``class`` (a class body) or ``TYPE_CHECKING``."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, where
        return
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        where = "function"
    elif isinstance(node, ast.ClassDef) and where != "function":
        where = "class"
    elif isinstance(node, ast.If) and _is_type_checking(node.test):
        for stmt in node.body:
            yield from _imports(stmt, "TYPE_CHECKING" if where == "module" else where)
        for stmt in node.orelse:
            yield from _imports(stmt, where)
        return
    for child in ast.iter_child_nodes(node):
        yield from _imports(child, where)


def module_name(path: Path, src: Path) -> str:
    """``src/marginlab/core/linear.py`` -> ``marginlab.core.linear`` (``__init__.py``: the package)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute module names an import statement names (relative imports resolved; for ``from X import
    a, b`` the candidates ``X.a`` and ``X.b``, which callers match against real modules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join([*here, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def misplaced_imports(src: Path, package: str) -> list[str]:
    """``file:line (where): statement`` for every import of ``package``'s own modules that is not at the top
    level of its file: inside a function or class body, or under ``if TYPE_CHECKING:``."""
    found = []
    for path in sorted((src / package).rglob("*.py")):
        module = module_name(path, src)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, where in _imports(tree):
            names = imported_names(node, module, path.name == "__init__.py")
            own = any(n == package or n.startswith(package + ".") for n in names)
            if own and where != "module":
                found.append(f"{path.relative_to(src)}:{node.lineno} ({where}): {ast.unparse(node)}")
    return found


def package_edges_from_ast(src: Path, package: str) -> set[tuple[str, str]]:
    """``(A, B)`` for every child ``A`` of ``package`` with an import statement (anywhere in a file) of a
    module of another child ``B``: the package graph read without grimp."""
    top = src / package
    children = {p.stem for p in top.glob("*.py")} | {p.parent.name for p in top.glob("*/__init__.py")}
    children = {c for c in children if not c.startswith("__")}
    edges = set()
    for path in sorted((src / package).rglob("*.py")):
        module = module_name(path, src)
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in children:
            continue
        for node, _ in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for name in imported_names(node, module, path.name == "__init__.py"):
                target = name.split(".")
                if target[0] == package and len(target) > 1 and target[1] in children:
                    edges.add((parts[1], target[1]))
    return {(a, b) for a, b in edges if a != b}


def load_script() -> ModuleType:
    """``scripts/package_graph.py`` as a module."""
    spec = importlib.util.spec_from_file_location("package_graph", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- marginlab ------------------------------------------------------------------------------------
def test_layers_contract_holds() -> None:
    result = lint_imports(ROOT, SRC)
    assert "Contracts:" in result.stdout, result.stdout + result.stderr  # the contracts were read and run
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


def test_no_import_cycles(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = import_graph(PACKAGE, SRC, monkeypatch)
    assert len(graph.modules) > 50  # the real package was read
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n\n  ".join(describe_cycle(graph, c) for c in cycles)


def test_own_modules_are_imported_at_the_top_of_files() -> None:
    found = misplaced_imports(SRC, PACKAGE)
    assert not found, "imports of marginlab modules not at the top of their file:\n" + "\n".join(found)


def test_package_graph_in_the_docs_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_graph_reads_the_real_imports() -> None:
    """The script's package dependencies (grimp) equal those read here from the sources with ``ast``."""
    nodes, edges = load_script().package_edges()
    assert {"base", "core", "commands"} <= set(nodes) and ("cli", "commands") in edges
    assert edges == package_edges_from_ast(SRC, PACKAGE)


# -- the checkers can fail ------------------------------------------------------------------------
BROKEN = {
    "pyproject.toml": """
[tool.importlinter]
root_package = "layerdemo"

[[tool.importlinter.contracts]]
name = "layerdemo is layered"
type = "layers"
layers = ["layerdemo.high", "layerdemo.low"]
""",
    "layerdemo/__init__.py": "",
    "layerdemo/high/__init__.py": "",
    "layerdemo/high/app.py": "from layerdemo.low import core\n",
    "layerdemo/low/__init__.py": "",
    "layerdemo/low/core.py": """from typing import TYPE_CHECKING

from layerdemo.high import app  # upward, and a cycle with app

if TYPE_CHECKING:
    from layerdemo.high.app import Thing


def f():
    from . import util

    return app, util
""",
    "layerdemo/low/util.py": "import os\n",
}


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """A package ``layerdemo`` (``high`` above ``low``) whose ``low.core`` imports ``high.app``, which
    imports it back; with a function-local and a ``TYPE_CHECKING`` import of its own modules."""
    for name, text in BROKEN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_checkers_report_a_broken_package(broken: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = lint_imports(broken, broken)
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout + result.stderr
    assert "layerdemo.low.core -> layerdemo.high.app" in result.stdout

    graph = import_graph("layerdemo", broken, monkeypatch)
    cycles = import_cycles(graph)
    assert cycles == [["layerdemo.high.app", "layerdemo.low.core", "layerdemo.high.app"]]
    assert "(line 3: from layerdemo.high import app" in describe_cycle(graph, cycles[0])

    assert misplaced_imports(broken, "layerdemo") == [
        "layerdemo/low/core.py:6 (TYPE_CHECKING): from layerdemo.high.app import Thing",
        "layerdemo/low/core.py:10 (function): from . import util",
    ]
    assert package_edges_from_ast(broken, "layerdemo") == {("low", "high"), ("high", "low")}


def test_package_graph_check_fails_when_stale(broken: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script()
    monkeypatch.syspath_prepend(str(broken))
    nodes, edges = script.package_edges("layerdemo", broken)
    assert (nodes, edges) == (["high", "low"], {("high", "low"), ("low", "high")})
    assert "A CYCLE" in script.render(nodes, edges)  # nothing left out of a cyclic graph

    doc = broken / "doc.md"
    doc.write_text(f"# t\n\n{script.START}\nold picture\n{script.END}\n\nafter\n")
    assert script.main(["--check", "--doc", str(doc)]) == 1
    assert script.main(["--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old picture" not in text and "flowchart TB" in text and text.endswith(f"{script.END}\n\nafter\n")
    assert script.main(["--check", "--doc", str(doc)]) == 0


def test_transitive_reduction_keeps_only_the_necessary_arrows() -> None:
    script = load_script()
    nodes = ["a", "b", "c", "d"]
    edges = {("a", "b"), ("b", "c"), ("a", "c"), ("a", "d"), ("c", "d")}
    assert script.transitive_reduction(nodes, edges) == {("a", "b"), ("b", "c"), ("c", "d")}
    assert script.topological_order(nodes, edges) == ["a", "b", "c", "d"]
