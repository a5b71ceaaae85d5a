"""One owner per concept (issue 16): the names and readers of a run directory live in ``marginlab.lab``,
``KEY=VALUE`` arguments have one parser (``marginlab.base.config``), and the default attack sets one
table (``marginlab.estimators.presets``)."""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import marginlab
from marginlab.base.config import apply_overrides, parse_key_values
from marginlab.base.errors import ConfigError, RunDirError
from marginlab.cli import main
from marginlab.commands import bracket as bracket_command
from marginlab.commands.args import parse_options
from marginlab.core.norms import Norm
from marginlab.estimators import bracket as bracket_module
from marginlab.estimators import build_estimator, estimate_margins, presets
from marginlab.lab import names
from marginlab.lab.margins_table import read_columns, write_table
from marginlab.lab.readers import read_robustness, read_robustness_extra
from marginlab.nets.models import build_model
from marginlab.plots import bracket as bracket_plot
from marginlab.robustness import RobustnessResult, RobustnessSettings
from marginlab.sweep import parse_grid, plan_sweep

SRC = Path(marginlab.__file__).parent

# The spellings a run directory must keep (its files are compared bit for bit across versions).
SPELLINGS = {
    "CONFIG": "config.json",
    "PROVENANCE": "provenance.json",
    "METRICS": "metrics.jsonl",
    "SUMMARY": "summary.json",
    "CHECKPOINT": "checkpoint.pt",
    "LOCK": ".lock",
    "FIGURES": "figures",
    "MARGINS": "margins",
    "TENSORBOARD": "tensorboard",
    "WEIGHTS": "model.pt",
    "ROBUSTNESS": "robustness.json",
    "SVM": "svm.npz",
    "ADV_IMAGES": "adv_images.npz",
    "SUBRUNS": "runs",
    "TABLE_CSV": "table.csv",
    "TABLE_MD": "table.md",
    "SWEEP_MANIFEST": "sweep.json",
    "SWEEP_CSV": "sweep.csv",
    "SWEEP_MD": "sweep.md",
    "REPORT_HTML": "report.html",
    "REPORT_MD": "report.md",
    "REPORT_FIGURES": "report-figures",
    "MARGINS_TABLE": "margins",
    "MARGINS_SUMMARY": "summary.json",
    "MARGINS_FIGURE": "margins.png",
    "HISTOGRAMS_FIGURE": "histograms.png",
    "LOSS_ACCURACY_FIGURE": "loss_accuracy.png",
    "LOSS_ERROR_FIGURE": "loss_error.png",
    "COSINE_FIGURE": "cosine.png",
    "ADVERSARIAL_FIGURE": "adversarial.png",
    "MARGIN_CURVES_FIGURE": "margin_curves.png",
    "ROBUSTNESS_FIGURE": "robustness.png",
    "BRACKET_FIGURE": "bracket.png",
}
# A file name in a string: a stem, a dot and an extension marginlab writes.
FILE_NAME = re.compile(r"(?<![\w-])[A-Za-z0-9_][\w-]*\.(?:png|json|jsonl|csv|md|npz|pt|parquet|html)\b")
# Folder names that mean nothing else ("figures", "margins" and "runs" are also summary keys and labels).
FOLDERS = {"tensorboard", "report-figures", ".lock"}


def _modules(*skip: str) -> Iterator[tuple[str, ast.Module]]:
    """``(path relative to marginlab, AST)`` of every module, except those under the folders ``skip``."""
    for file in sorted(SRC.rglob("*.py")):
        rel = file.relative_to(SRC).as_posix()
        if not rel.startswith(tuple(f"{s}/" for s in skip)):
            yield rel, ast.parse(file.read_text(), rel)


def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_lab_names_keep_their_spellings() -> None:
    assert {k: getattr(names, k) for k in SPELLINGS} == SPELLINGS
    assert names.margins_file("r", 7) == Path("r/margins/epoch-0007.npz")
    assert names.subrun_dir("r", "mlp", "standard", 2) == Path("r/runs/mlp/standard-seed2")


def test_no_run_directory_name_is_spelled_outside_lab() -> None:
    """Docstrings may name files; code (f-strings, messages, help texts included) takes the constants."""
    found = []
    for rel, tree in _modules("lab", "data"):  # data/: the files of datasets, not of run directories
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                hits = FILE_NAME.findall(node.value) + [node.value] * (node.value in FOLDERS)
                found += [f"{rel}:{node.lineno}: {hit!r}" for hit in hits]
    assert found == []


def test_the_scan_sees_a_spelled_name() -> None:
    """The scan above can fail: it finds a name in code and in an f-string, not in a docstring."""
    tree = ast.parse('"""summary.json"""\nx = f"{d}/summary.json"\ny = "tensorboard"\n')
    docs = _docstrings(tree)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docs]
    assert [h for s in strings for h in FILE_NAME.findall(s)] == ["summary.json"]
    assert [s for s in strings if s in FOLDERS] == ["tensorboard"]


def test_run_directory_files_are_read_in_lab_only() -> None:
    """``read_json``/``read_jsonl``/``read_npz`` of a run's files happen in ``lab`` (the format's own
    ``RobustnessResult.load``, below lab, is what ``lab.readers.read_robustness`` calls)."""
    readers = {"read_json", "read_jsonl", "read_npz"}
    found = []
    for rel, tree in _modules("lab", "base"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in readers and rel != "robustness/evaluate.py":
                    found.append(f"{rel}:{node.lineno}: {name}")
    assert found == []


def test_robustness_is_read_through_its_load(tmp_path: Path) -> None:
    result = RobustnessResult(
        norm="L2", eps=[0.5], stages=["pgd"], n=2, clean_accuracy=1.0, accuracy={"pgd": [0.5]},
        worst_case=[0.5], bound=None, bound_share=None, attacked={"pgd": [2]},
        points={"label": [0, 1], "correct": [True, True], "robust": [[True, False]]},
        settings={"attacks": ["pgd"]}, seconds={"pgd": 0.1},
    )  # fmt: skip
    result.save(tmp_path / "robustness.json", reference_eps=1.5)
    assert read_robustness(tmp_path) == result
    assert read_robustness_extra(tmp_path) == {"reference_eps": 1.5}
    (tmp_path / "robustness.json").write_text("[1]")
    with pytest.raises(RunDirError, match="robustness.json"):
        read_robustness(tmp_path)


# -- KEY=VALUE ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("item", ["novalue", "=3", "  = 3"])
def test_key_value_errors_are_worded_per_entry_point(item: str) -> None:
    cases = [
        (lambda: apply_overrides({}, [item]), f"override {item!r} is not of the form key.sub=value"),
        (lambda: parse_options([item]), f"option {item!r} is not of the form KEY=VALUE"),
        (lambda: parse_grid([item]), f"grid {item!r} is not of the form key=v1,v2"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value) == message


def test_key_value_entry_points_parse_alike() -> None:
    items = [" a.b = 1e-3 ", "c=[1, 2]", "d=true", "e=text", 'f="q"', "g=1=2", "e=again"]
    flat = {"a.b": 0.001, "c": [1, 2], "d": True, "e": "again", "f": "q", "g": "1=2"}
    assert parse_key_values(items) == flat
    assert parse_options(items) == flat
    nested = {"a": {"x": 0, "b": 0.001}, **{k: flat[k] for k in "cdefg"}}
    assert apply_overrides({"a": {"x": 0}}, items) == nested
    grid = parse_grid([" a.b = 1e-3 ,2", "c=[1, 2]"])
    assert grid == {"a.b": ["1e-3", "2"], "c": ["[1, 2]"]}
    assert plan_sweep({}, grid)[0].values == {"a.b": 0.001, "c": [1, 2]}


def test_one_key_value_splitter() -> None:
    """``partition("=")`` splits KEY=VALUE in base/config.py alone (nets/ parses other syntaxes: key maps
    ``OLD=NEW,...`` and ``mean=M,std=S``)."""
    found = []
    for rel, tree in _modules("nets"):
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "partition"
                and [getattr(a, "value", None) for a in node.args] == ["="]
                and rel != "base/config.py"
            ):
                found.append(f"{rel}:{node.lineno}")
    assert found == []


# -- presets --------------------------------------------------------------------------------------------
def test_default_attack_sets() -> None:
    assert presets.best_attacks(2) == ("ddn", "fmn") and presets.best_attacks("Linf") == ("fmn", "deepfool")
    assert presets.bracket_attacks(2.0) == ("deepfool", "ddn")
    assert presets.bracket_attacks(math.inf) == ("deepfool", "fmn")
    assert presets.prepass_bound("L2") == "ddn" and presets.prepass_bound(Norm.Linf) == "fmn"
    with pytest.raises(ConfigError, match="unsupported norm"):
        presets.best_attacks(1)


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    return model, torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])


def test_the_three_defaults_come_from_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Change the table and every default follows: best, bracket and the robustness pre-pass."""
    changed = presets.AttackPresets(best=("deepfool",), bracket=("fab",), prepass_bound="deepfool")
    monkeypatch.setitem(presets.PRESETS, Norm.L2, changed)
    assert RobustnessSettings().bound == "deepfool"
    assert RobustnessSettings(norm="Linf").bound == "fmn"
    assert presets.best_attacks(2.0) == ("deepfool",)
    model, x, y = _tiny()
    alone = build_estimator("deepfool")(model, x, y)
    assert torch.equal(build_estimator("best")(model, x, y), alone)
    res = estimate_margins(model, x, y, ["best"])["best"]
    assert res.params["attacks"] == ["deepfool"] and torch.equal(res.values, alone)

    built: list[str] = []

    def fake_build(name: str, **kw: object) -> object:
        built.append(name)
        return lambda model, x, y, p: torch.ones(len(x), dtype=torch.float64)

    monkeypatch.setattr(bracket_module, "build_estimator", fake_build)
    bracket_module.compute_bracket(model, x, y, p=2.0)
    assert built == ["crown", "fab"]


# -- the bracket figure ---------------------------------------------------------------------------------
def test_bracket_figure_is_drawn_from_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inf, nan = math.inf, math.nan
    columns = {"index": [4, 5, 6], "label": [0, 1, 1], "prediction": [0, 0, 1]}
    columns |= {"crown": [0.1, -0.2, 0.0], "best": [0.5, -0.3, inf], "ratio": [5.0, 1.5, inf]}
    table = tmp_path / "margins.csv"
    write_table(table, {**columns, "mip": [0.25, nan, nan], "mip_status": ["exact", "timeout", "timeout"]})
    assert read_columns(table, ["best", "mip", "absent"]).keys() == {"best", "mip"}
    figures: list = []
    monkeypatch.setattr(bracket_plot, "save", lambda fig, path: figures.append(fig) or Path(path))
    bracket_plot.plot_bracket(table, tmp_path / "b.png", p=2.0, domain="box")
    up, lo, ex = (np.asarray(line.get_ydata()) for line in figures[-1].axes[0].lines)
    np.testing.assert_array_equal(up, [0.3, 0.5, inf])  # sorted by |best|
    np.testing.assert_array_equal(lo, [0.2, 0.1, 0.0])
    np.testing.assert_array_equal(ex, [nan, 0.25, nan])
    write_table(table, columns)  # no exact margins: no dots
    bracket_plot.plot_bracket(table, tmp_path / "b.png", p=math.inf, domain="rd")
    assert len(figures[-1].axes[0].lines) == 2


def test_bracket_command_draws_from_the_written_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(build_model("mlp", input_shape=(1, 8, 8), widths=(8,)).state_dict(), weights)
    seen: list[tuple[Path, dict[str, np.ndarray]]] = []

    def fake_plot(table: Path, path: Path, *, p: float, domain: str) -> Path:
        seen.append((Path(table), read_columns(table, ["crown", "best"])))
        return Path(path)

    monkeypatch.setattr(bracket_command, "plot_bracket", fake_plot)
    out = tmp_path / "b"
    argv = ["margins", "--model", "mlp", "--option", "widths=[8]", "--weights", str(weights), "--data"]
    assert main([*argv, "digits", "--n", "3", "--estimators", "bracket", "--out", str(out)]) == 0
    [(table, cols)] = seen
    assert table == out / "margins.csv" and len(cols["crown"]) == len(cols["best"]) == 3
