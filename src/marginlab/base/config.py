"""Configs: TOML files, dotted ``key=value`` overrides, and frozen dataclasses.

The one parser of ``KEY=VALUE`` arguments is here (:func:`split_key_value`, :func:`parse_key_values`).

An experiment's config is a frozen dataclass (nested dataclasses for sections). ``from_dict`` builds it
from the parsed TOML, rejecting unknown keys and values of the wrong type with a one-line
:class:`ConfigError` that names the offending key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from marginlab.base.errors import ConfigError
from marginlab.base.fsio import to_jsonable
from marginlab.base.seed import check_seed  # lazy: config stays free of torch and numpy

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")  # a dataclass type, what from_dict builds

INT_LIMIT = 2**63  # integer config values must lie strictly between -INT_LIMIT and INT_LIMIT


def load_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file ``path`` as nested dicts; a missing, malformed or non-UTF-8 file raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed TOML in {path}: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"config file {path} nests arrays or tables too deeply") from None


def parse_value(text: str) -> Any:
    """Parse an override value as TOML (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"s"``), else a string;
    arrays nested beyond Python's recursion limit raise :class:`ConfigError`."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:  # "[[[[...": no value is nested that deeply
        raise ConfigError(f"value {text[:20]!r}... nests arrays or tables too deeply") from None


def split_key_value(item: str, what: str = "override", form: str = "key.sub=value") -> tuple[str, str]:
    """``"a.b = 1e-3"`` -> ``("a.b", "1e-3")``: the one splitter of ``KEY=VALUE`` arguments (overrides,
    ``--option``, ``--param``, ``--grid``). Key and value are stripped; the value stays text. An item
    without ``=`` or with an empty key raises ``ConfigError("{what} {item!r} is not of the form {form}")``.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} {item!r} is not of the form {form}")
    return key.strip(), value.strip()


def parse_key_values(
    items: Sequence[str], what: str = "override", form: str = "key.sub=value"
) -> dict[str, Any]:
    """``["a.b=1", "c=[2, 3]"]`` -> ``{"a.b": 1, "c": [2, 3]}``: each item split by
    :func:`split_key_value` (``what``/``form`` word its error) and its value parsed by :func:`parse_value`;
    a key given twice keeps its last value."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, value = split_key_value(item, what, form)
        parsed[key] = parse_value(value)
    return parsed


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``config`` with dotted ``a.b.c=value`` overrides applied (values parsed as TOML)."""
    return merge_overrides(config, parse_key_values(overrides))


def merge_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``overrides`` applied: the one override function of marginlab.

    Keys may be dotted (``"train.epochs"``) and values nested tables; a table merges into a table,
    anything else replaces the value. The CLI's ``key=value`` arguments, sweep grids and the bases of a
    comparison all come through here."""
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
            node = child
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = merge_overrides(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The TOML file ``path`` with dotted ``key=value`` ``overrides`` applied (:func:`apply_overrides`)."""
    return apply_overrides(load_toml(path), overrides or [])


def from_dict(cls: type[D], data: dict[str, Any], where: str = "") -> D:
    """Build dataclass ``cls`` from ``data``, checking keys and types; nested dataclasses recurse."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config{' ' + where if where else ''}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (int/float/str/bool, Optional, tuple/list, Literal, dataclass)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r} has an invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            value = [value]  # a scalar where a list is expected: accept `estimators = "x"`
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a type hint: a class, never an instance
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        if _is_seed(key):
            return check_seed(value, f"config key {key!r}")
        # torch and numpy take 64-bit integers; a larger one overflows deep inside (or runs forever)
        if not -INT_LIMIT < value < INT_LIMIT:
            raise ConfigError(f"config key {key!r} must be an integer below 2**63 in magnitude, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if origin is dict or (isinstance(tp, type) and issubclass(tp, dict)):  # dict and dict[str, ...]
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a table, got {value!r}")
        return value
    return value


def _is_seed(key: str) -> bool:
    """Whether config key ``key`` (``a.b.seed``, ``grid.seed[2]``) holds a random seed."""
    leaf = key.rsplit(".", 1)[-1].split("[", 1)[0]
    return leaf == "seed" or leaf.endswith("_seed")


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (tuples become lists), ready for ``config.json``."""
    return to_jsonable(obj)


def require(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``; for ``__post_init__`` checks."""
    if not cond:
        raise ConfigError(message)


def check_positive(name: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    """Validate a hyperparameter: finite and > 0 (or >= 0 with ``allow_zero``)."""
    if value is None:
        return
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    bound = ">= 0" if allow_zero else "> 0"
    require(ok, f"{name} must be a finite number {bound}, got {value!r}")


def check_count(name: str, value: object, minimum: int = 1) -> None:
    """Validate a count (steps, samples, restarts, batch size): an int in ``[minimum, 2**63)``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and minimum <= value < INT_LIMIT
    require(ok, f"{name} must be an integer >= {minimum}, got {value!r}")
