"""A standing guard against bad input (issue 21): invalid values for every CLI option and every config key
of every command give exit 2, exactly one stderr line ``marginlab: error: ...`` and no new file.

Nothing here is a hand list of options: the options come from the argparse parsers that
``marginlab.cli.build_parser`` builds (each sub-command, each action: its type, choices, nargs), and the
config keys from the frozen dataclasses of every experiment kind (``marginlab.experiments.EXPERIMENTS``,
read with ``typing.get_type_hints``), so an option or key added later is fuzzed without touching this file.
What an option's text means cannot be read from argparse, so option names are sorted into a few kinds
(input path, output directory, free text); an option named nowhere is fuzzed as a *name* (a registry name,
a list, ``KEY=VALUE``...), which no unicode garbage, empty or 5000-character text may satisfy.

Each example is cheap by construction: the other options form a valid, tiny invocation (8x8 digits, a
16-unit MLP, 5 points), and the work itself (training, margin estimation, attacks, a sweep) is replaced by
a sentinel that raises :class:`WorkStarted`, so an invalid value that is not refused before any work fails
the test at once, naming the option and the value, instead of training a model. Hypothesis is
derandomized (the same examples on every machine); shrinking is off (each failure is already one value).

Profiles: ``fuzz-default`` (an empty value, the longest value and two drawn ones per option; the file runs
within a minute on 2 cores) and
``fuzz-slow`` (many more; the tests marked ``slow``: ``pytest -m slow tests/test_fuzz_cli.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import marginlab.commands.margins as margins_cmd
import marginlab.commands.robustness as robustness_cmd
import marginlab.sweep as sweep_mod
from conftest import tiny_train_toml, without_log_lines
from marginlab.cli import build_parser, main
from marginlab.experiments import EXPERIMENTS

_COMMON = dict(
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing example is already one value
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    report_multiple_bugs=False,
    database=None,
)
settings.register_profile("fuzz-default", max_examples=2, **_COMMON)  # + 2 explicit examples
settings.register_profile("fuzz-slow", max_examples=150, **_COMMON)
DEFAULT, SLOW = settings.get_profile("fuzz-default"), settings.get_profile("fuzz-slow")


# The user-error line. argparse's own errors inside a sub-command are spelt ``marginlab run: error: ...``
# (the sub-parser's prog); test_usage_error_line_is_marginlab_error holds them to the exact contract.
ERROR_LINE = re.compile(r"^marginlab( [a-z]+)?: error: ")


class WorkStarted(Exception):
    """Raised in place of the real work: the command accepted every value it was given."""


# -- the kinds of option text, by dest ---------------------------------------------------------------------
INPUT_FILES = {"config", "weights"}  # must name an existing, readable file
INPUT_DIRS = {"run_dirs", "dir", "resume", "data_dir"}  # must name an existing directory
OUTPUT_DIRS = {"out"}  # a directory made or reused: never an existing file, never an unwritable place
FREE_TEXT = {"title", "partition", "mem", "keys"}  # any text is a valid value: not fuzzed
# Numeric options for which 0 is a valid value (every other count, size or radius must be > 0).
ZERO_OK = {"seed", "gpus_per_task"}

# Bugs known and not yet fixed, marked xfail(strict=True) so that a fix is noticed: (command, dest) -> the
# reason. Issue 21's are all fixed; keep the mechanism for the next ones the fuzz finds.
KNOWN_BUGS: dict[tuple[str, str], str] = {}
# Found only by the many examples of the slow profile: (command, dest) -> reason.
KNOWN_SLOW_BUGS: dict[tuple[str, str], str] = {}
# Config keys: (kind, key) -> reason.
KNOWN_CONFIG_BUGS: dict[tuple[str, str], str] = {}


# -- what the parsers say ----------------------------------------------------------------------------------
def subparsers() -> dict[str, argparse.ArgumentParser]:
    """Every sub-command's parser, by name."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def fuzzable_actions() -> Iterator[tuple[str, argparse.Action]]:
    """``(command, action)`` for every option and positional of every sub-command (help aside)."""
    for name, p in subparsers().items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if action.dest in FREE_TEXT:
                continue
            yield name, action


ACTIONS = list(fuzzable_actions())


def _case_id(case: tuple[str, argparse.Action]) -> str:
    command, action = case
    return f"{command}-{action.option_strings[0] if action.option_strings else action.dest}"


# -- invalid values ----------------------------------------------------------------------------------------
GARBAGE_CHARS = st.sampled_from(list("☃é∞ß\u202e\t \x7f\udcff,=:;[]{}\"'\\$*?") + ["\U0001f600"])
ANY_CHAR = st.characters(blacklist_characters="\x00")
GARBAGE = st.one_of(
    st.just(""),
    st.just(" "),
    st.just("x" * 5000),
    st.just("☃" * 300),
    # any text (but NUL, which no argv can hold) followed by at least one character no name has
    st.builds(
        lambda a, b: a + b, st.text(ANY_CHAR, max_size=5), st.text(GARBAGE_CHARS, min_size=1, max_size=8)
    ),
)
NOT_NUMBERS = st.one_of(GARBAGE, st.sampled_from(["1.5e", "0x", "1,2", "--1", "1 2", "Infinity!"]))
HUGE_INTS = st.integers(min_value=64, max_value=400).map(lambda k: str(2**k))
NON_FINITE = st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-1e400"])


def numeric_values(action: argparse.Action) -> st.SearchStrategy[str]:
    """Text that no integer / number option may accept: not a number, beyond 64 bits, not finite, and
    (unless 0 is a valid value) zero or negative."""
    bad = [NOT_NUMBERS, NON_FINITE]
    if action.type is not float:  # (a huge finite float is a float; int() reads "١٢" as 12: both valid)
        bad += [HUGE_INTS, HUGE_INTS.map(lambda s: "-" + s), st.sampled_from(["1.5", "1e3", "2.0"])]
    bad.append(st.integers(-(2**62), -1).map(str))
    if action.dest not in ZERO_OK:
        bad.append(st.sampled_from(["0", "-0", "0.0" if action.type is float else "0"]))
    return st.one_of(*bad)


@dataclasses.dataclass(frozen=True)
class Paths:
    """Pathological paths, all under one folder ``root`` that the test watches for new files."""

    root: Path

    @property
    def file(self) -> Path:
        return self.root / "a-file.txt"

    @property
    def folder(self) -> Path:
        return self.root / "a-folder"

    def missing(self) -> list[str]:
        r = self.root
        return [str(r / "missing"), str(r / "☃-missing-é"), str(self.file / "under-a-file")]

    def too_long(self) -> list[str]:
        return [str(self.root / ("x" * 300)), str(self.root / "/".join(["y" * 200] * 25))]

    def unwritable(self) -> list[str]:
        return ["/proc/marginlab-fuzz/out", "/dev/null/out", str(self.file / "out")]


def path_values(kind: str, paths: Paths) -> st.SearchStrategy[str]:
    """Invalid paths for an input file, an input directory or an output directory."""
    if kind == "file":
        bad = [*paths.missing(), *paths.too_long(), str(paths.folder), "", "/dev/null"]
    elif kind == "dir":
        bad = [*paths.missing(), *paths.too_long(), str(paths.file), "", "/dev/null"]
    else:  # an output directory
        bad = [*paths.too_long(), *paths.unwritable(), str(paths.file), "", "/dev/null"]
    return st.sampled_from(bad)


def invalid_values(command: str, action: argparse.Action, paths: Paths) -> st.SearchStrategy[list[str]]:
    """The argv pieces that give ``action`` of ``command`` an invalid value."""
    flag = action.option_strings[0] if action.option_strings else None

    def put(text: str) -> list[str]:
        return [f"{flag}={text}"] if flag else [text]

    if action.nargs == 0:  # a switch: a value is an error (--force=yes)
        return st.sampled_from(["yes", "", "☃"]).map(lambda v: [f"{flag}={v}"])
    if action.choices is not None:
        values = GARBAGE.filter(lambda v: v not in action.choices)  # type: ignore[operator]
    elif action.type in (int, float) or getattr(action.type, "__name__", "") in ("int_arg", "seed_arg"):
        values = numeric_values(action)
    elif action.dest in INPUT_FILES:
        values = path_values("file", paths)
    elif action.dest in INPUT_DIRS:
        values = path_values("dir", paths)
    elif action.dest in OUTPUT_DIRS:
        values = path_values("out", paths)
    else:  # a name, a list of names, KEY=VALUE, a spec: no garbage may pass
        values = GARBAGE
    return values.map(put)


def explicit_example(command: str, action: argparse.Action, paths: Paths, which: str) -> list[str]:
    """The two values every option is always given (the ones most often let through): an empty value
    and the longest one (5000 characters, or a path longer than the filesystem allows)."""
    flag = action.option_strings[0] if action.option_strings else None
    if action.nargs == 0:
        return [f"{flag}={'' if which == 'empty' else 'x' * 5000}"]
    if which == "empty":
        text = ""
    elif action.dest in INPUT_FILES | INPUT_DIRS | OUTPUT_DIRS:
        text = paths.too_long()[0]
    else:
        text = "x" * 5000
    return [f"{flag}={text}"] if flag else [text]


# -- valid, cheap invocations --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class World:
    """The files the valid part of each invocation names (made once per session)."""

    root: Path
    config: Path  # a tiny train config
    run: Path  # a finished tiny train run
    weights: Path


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("fuzz-world")
    config = root / "tiny.toml"
    config.write_text(tiny_train_toml(epochs=1, n_train=100))
    with pytest.MonkeyPatch.context() as m:  # no figures: no invocation here needs them
        m.setattr(EXPERIMENTS["train"], "plot", lambda run_dir: [])
        assert main(["-q", "run", str(config), "--out", str(root / "run")]) == 0
    return World(root, config, root / "run", root / "run" / "model.pt")


MODEL = ["--model", "mlp", "--option", "widths=[16]"]


def base_argv(command: str, w: World, out: Path) -> dict[str, list[str]]:
    """A valid invocation of ``command`` as ``{dest: argv pieces}``, writing (if at all) under ``out``."""
    points = {"data": ["--data", "digits"], "n": ["--n", "5"], "weights": ["--weights", str(w.weights)]}
    model = {"model": MODEL[:2], "option": MODEL[2:], **points}
    return {
        "run": {"config": [str(w.config)], "out": ["--out", str(out / "run")]},
        "sweep": {"config": [str(w.config)], "grid": ["--grid", "seed=0"], "out": ["--out", str(out / "sw")]},
        "plot": {"run_dirs": [str(w.run)]},
        "report": {"run_dirs": [str(w.run)], "out": ["--out", str(out / "rep")]},
        "status": {"dir": [str(w.run)]},
        "data": {"action": ["check"], "datasets": ["digits"]},
        "margins": {**model, "estimators": ["--estimators", "first-order"], "out": ["--out", str(out / "m")]},
        "robustness": {
            **model,
            "eps": ["--eps", "0.1"],
            "attacks": ["--attacks", "pgd"],
            "certify": ["--certify", "off"],
            "bound": ["--bound", "none"],
            "steps": ["--steps", "1"],
            "out": ["--out", str(out / "r")],
        },
    }[command]


def argv_with(command: str, action: argparse.Action, value: list[str], w: World, out: Path) -> list[str]:
    """The valid invocation of ``command`` with ``action``'s pieces replaced by ``value``; positionals in
    the parser's order, then the options."""
    pieces = base_argv(command, w, out)
    pieces[action.dest] = value
    p = subparsers()[command]
    positionals = [a.dest for a in p._actions if not a.option_strings and a.dest in pieces]
    argv = [command]
    for dest in positionals:
        argv += pieces.pop(dest)
    for v in pieces.values():
        argv += v
    return argv


# -- the contract ------------------------------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Replace every command's work by :class:`WorkStarted` (validation runs as it does), in the watched
    folder: an output that falls back to a default place (``runs/...``, ``.``) lands there and is seen."""
    monkeypatch.chdir(tmp_path)

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise WorkStarted

    for experiment in EXPERIMENTS.values():
        monkeypatch.setattr(experiment, "run", stop)
    monkeypatch.setattr(margins_cmd, "estimate_margins", stop)
    monkeypatch.setattr(margins_cmd, "bracket_main", stop)
    monkeypatch.setattr(robustness_cmd, "robust_accuracy", stop)
    monkeypatch.setattr(sweep_mod, "_run_locked", stop)  # run_sweep's checks run, its runs do not


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (what a command may not change)."""
    out = {}
    for p in root.rglob("*"):
        st_ = p.lstat()
        out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


def check_refused(argv: list[str], watched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2, one ``marginlab: error:`` line, no traceback, nothing new or changed under ``watched``."""
    before = tree(watched)
    capsys.readouterr()
    try:
        code = main(["-q", *argv])
    except WorkStarted:
        pytest.fail(f"accepted (the work started): marginlab {' '.join(map(repr, argv))}")
    except SystemExit as e:  # argparse's own errors (usage) exit through SystemExit
        code = int(e.code or 0)
    err = capsys.readouterr().err
    lines = without_log_lines(err)
    assert code == 2, (argv, code, err[-2000:])
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), (argv, err[-2000:])
    assert "Traceback" not in err
    after = tree(watched)
    assert after == before, (argv, sorted(set(after) ^ set(before)) or "a file changed")


def _prepare(root: Path) -> Paths:
    paths = Paths(root)
    paths.file.write_text("not what any option wants\n")
    paths.folder.mkdir(exist_ok=True)
    return paths


def _xfail(command: str, dest: str) -> list[Any]:
    reason = KNOWN_BUGS.get((command, dest))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


CASES = [pytest.param(c, a, id=_case_id((c, a)), marks=_xfail(c, a.dest)) for c, a in ACTIONS]


def _fuzz_option(
    command: str, action: argparse.Action, world: World, tmp_path: Path, capsys: Any, profile: settings
) -> None:
    paths = _prepare(tmp_path)

    @profile
    @given(value=invalid_values(command, action, paths))
    @example(value=explicit_example(command, action, paths, "empty"))
    @example(value=explicit_example(command, action, paths, "long"))
    def run(value: list[str]) -> None:
        check_refused(argv_with(command, action, value, world, tmp_path / "out"), tmp_path, capsys)

    run()


@pytest.mark.parametrize("command, action", CASES)
def test_invalid_option_value(
    command: str, action: argparse.Action, world: World, tmp_path: Path, capsys: Any, no_work: None
) -> None:
    _fuzz_option(command, action, world, tmp_path, capsys, DEFAULT)


@pytest.mark.slow
@pytest.mark.parametrize("command, action", CASES)
def test_invalid_option_value_long(
    request: pytest.FixtureRequest,
    command: str,
    action: argparse.Action,
    world: World,
    tmp_path: Path,
    capsys: Any,
    no_work: None,
) -> None:
    reason = KNOWN_SLOW_BUGS.get((command, action.dest))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    _fuzz_option(command, action, world, tmp_path, capsys, SLOW)


def test_every_command_and_option_is_fuzzed() -> None:
    """The guard covers what the parsers hold: every sub-command, every option outside FREE_TEXT."""
    parsers = subparsers()
    assert {c for c, _ in ACTIONS} == set(parsers)
    for name, p in parsers.items():
        dests = {a.dest for a in p._actions if not isinstance(a, argparse._HelpAction)} - FREE_TEXT
        assert dests == {a.dest for c, a in ACTIONS if c == name}


# -- config keys -------------------------------------------------------------------------------------------
def config_keys(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, type)`` of every leaf of the config dataclass ``cls`` (nested sections recurse)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from config_keys(tp, key + ".")
        elif len(inner) == 1 and isinstance(inner[0], type) and dataclasses.is_dataclass(inner[0]):
            yield from config_keys(inner[0], key + ".")  # an optional section
        else:
            yield key, tp


def _accepts(tp: Any) -> set[str]:
    """The TOML value kinds a config type accepts: int, float, bool, str, list, table, any."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_accepts(a) for a in args if a is not type(None)))
    if origin is typing.Literal:
        return {"literal"}
    if origin in (tuple, list):
        return {"list"} | _accepts(args[0] if args else Any)  # a scalar stands for a one-item list
    if origin is dict or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return {"table"}
    if tp is Any or tp is object:
        return {"any"}
    if tp is bool:
        return {"bool"}
    if tp is int:
        return {"int"}
    if tp is float:
        return {"float", "int"}
    if tp is str:
        return {"str"}
    if isinstance(tp, type) and issubclass(tp, dict):
        return {"table"}
    return {"any"}


# TOML text of each value kind, and values no config key of any type may hold (not finite, beyond 64 bits)
TOML_OF = {
    "int": st.sampled_from(["3", "-7", "0"]),
    "float": st.sampled_from(["1.5", "-2.5e-3"]),
    "bool": st.sampled_from(["true", "false"]),
    "str": st.text(GARBAGE_CHARS, min_size=1, max_size=6).map(
        lambda s: '"' + s.replace('"', "").replace("\\", "") + '"'
    ),
    "list": st.sampled_from(["[]", "[[1], [2]]", "[{a = 1}]"]),
    "table": st.sampled_from(["{a = 1}", "{}"]),
}
NON_FINITE_TOML = st.sampled_from(["nan", "inf", "-inf", "+inf"])  # no number key may hold one
OVERFLOW_TOML = st.sampled_from([str(2**63), str(-(2**63)), str(2**100)])  # beyond an integer key


def config_values(tp: Any) -> st.SearchStrategy[str]:
    """TOML values of a kind that type ``tp`` does not accept, or numbers that no key of its type accepts."""
    ok = _accepts(tp)
    if "any" in ok:
        return st.nothing()
    wrong = [s for k, s in TOML_OF.items() if k not in ok and not (k == "str" and "literal" in ok)]
    if "literal" in ok:
        wrong.append(st.just('"no-such-choice-☃"'))
    if "list" in ok:  # a list whose items are wrong
        wrong.append(st.just("[{a = 1}]") if "table" not in ok else st.just("[nan]"))
    if ok & {"int", "float"}:
        wrong.append(NON_FINITE_TOML)
    if "int" in ok and "float" not in ok:
        wrong.append(OVERFLOW_TOML)
    return st.one_of(*wrong)


def _base_configs(world: World, root: Path) -> dict[str, Path]:
    """A valid config file of every experiment kind (the tiny train config, the quick presets)."""
    presets = Path(__file__).parents[1] / "configs"
    return {
        "train": world.config,
        "logreg-gd": presets / "logreg-quick.toml",
        "compare": presets / "compare-quick.toml",
    }


CONFIG_KEYS = [
    pytest.param(
        kind,
        key,
        tp,
        id=f"{kind}-{key}",
        marks=[pytest.mark.xfail(strict=True, reason=KNOWN_CONFIG_BUGS[kind, key])]
        if (kind, key) in KNOWN_CONFIG_BUGS
        else [],
    )
    for kind, exp in sorted(EXPERIMENTS.items())
    for key, tp in config_keys(exp.Config)
    if "any" not in _accepts(tp)  # a key of any value: nothing is of the wrong kind
]


def test_every_experiment_kind_has_a_base_config(world: World, tmp_path: Path) -> None:
    assert set(_base_configs(world, tmp_path)) == set(EXPERIMENTS)


@pytest.mark.parametrize("kind, key, tp", CONFIG_KEYS)
def test_invalid_config_value(
    kind: str, key: str, tp: Any, world: World, tmp_path: Path, capsys: Any, no_work: None
) -> None:
    """``marginlab run CONFIG key=<a value of the wrong kind>``: refused before the run directory exists."""
    config = _base_configs(world, tmp_path)[kind]

    @DEFAULT
    @given(value=config_values(tp))
    def run(value: str) -> None:
        check_refused(
            ["run", str(config), f"{key}={value}", "--out", str(tmp_path / "run")], tmp_path, capsys
        )

    run()


@DEFAULT
@given(key=st.text(st.sampled_from("abcxyz_."), min_size=1, max_size=12))
def test_unknown_config_key(
    key: str, world: World, tmp_path_factory: Any, capsys: Any, no_work: None
) -> None:
    """A key no experiment knows (a typo) is one line naming it, never a silent default."""
    key = "zz" + key.strip(".").replace("..", ".")
    out = tmp_path_factory.mktemp("unknown")
    check_refused(["run", str(world.config), f"{key}=1", "--out", str(out / "run")], out, capsys)


def test_usage_error_line_is_marginlab_error(capsys: Any) -> None:
    """A usage error inside a sub-command is the same one line as every other user error."""
    with pytest.raises(SystemExit) as e:
        main(["run", "--force=yes"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("marginlab: error: ")
