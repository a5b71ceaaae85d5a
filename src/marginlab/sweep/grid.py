"""Grid syntax and run naming: ``key=v1,v2`` axes -> cartesian product -> one named config per point."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from hashlib import sha1
from typing import Any

from marginlab.base.config import apply_overrides, parse_value, split_key_value
from marginlab.base.errors import ConfigError
from marginlab.base.fsio import to_jsonable

_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_MAX_NAME = 120  # run directory names stay well under the usual 255-byte limit


@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep: its directory name, grid values and full raw config."""

    name: str
    values: dict[str, Any]  # grid key -> parsed value
    overrides: tuple[str, ...]  # the grid's "key=value" overrides, applied after the base config
    config: dict[str, Any]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", "seed=0,1"]`` -> ``{"a.b": ["1", "2"], "seed": ["0", "1"]}`` (values as text)."""
    if not items:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2")
    grid: dict[str, list[str]] = {}
    for item in items:
        key, text = split_key_value(item, "grid", "key=v1,v2")
        if not _KEY.fullmatch(key):
            raise ConfigError(f"grid key {key!r} is not a dotted name like train.lr")
        if key in grid:
            raise ConfigError(f"grid key {key!r} is given twice; list all its values in one --grid")
        values = split_values(text, item)
        parsed = [json.dumps(to_jsonable(parse_value(v)), sort_keys=True) for v in values]
        if len(set(parsed)) < len(parsed):
            raise ConfigError(f"grid {item!r} lists the same value twice")
        grid[key] = values
    return grid


def split_values(text: str, item: str = "") -> list[str]:
    """Split on commas outside brackets and quotes: ``1,[2,3],"a,b"`` -> ``1``, ``[2,3]``, ``"a,b"``."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
        if depth < 0:
            break
    if quote or depth != 0:
        raise ConfigError(f"grid {item or text!r} has unbalanced brackets or quotes")
    values.append(text[start:].strip())
    if any(not v for v in values):
        raise ConfigError(f"grid {item or text!r} has an empty value; write key=v1,v2")
    return values


def run_name(values: dict[str, Any]) -> str:
    """A filesystem-safe directory name such as ``lr=0.01,seed=0`` (last key part, unless ambiguous)."""
    lasts = [k.rsplit(".", 1)[-1] for k in values]
    keys = [last if lasts.count(last) == 1 else full for last, full in zip(lasts, values, strict=True)]
    name = ",".join(f"{k}={_safe(_value_text(v))}" for k, v in zip(keys, values.values(), strict=True))
    if len(name) > _MAX_NAME:
        name = f"{name[: _MAX_NAME - 9]}-{_digest(values)}"
    return name


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: 0.01, 1e-05
    if isinstance(v, list):
        return "-".join(_value_text(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def _safe(text: str) -> str:
    # "=" and "," separate the parts of a name, "/" would nest directories: all become "_".
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


def _digest(values: dict[str, Any]) -> str:
    return sha1(json.dumps(to_jsonable(values), sort_keys=True).encode()).hexdigest()[:8]


def plan_sweep(base: dict[str, Any], grid: dict[str, list[str]]) -> list[SweepPoint]:
    """One :class:`SweepPoint` per element of the cartesian product (first grid key varies slowest)."""
    points: list[SweepPoint] = []
    for combo in itertools.product(*grid.values()):
        overrides = tuple(f"{k}={v}" for k, v in zip(grid, combo, strict=True))
        values = {k: parse_value(v) for k, v in zip(grid, combo, strict=True)}
        points.append(SweepPoint(run_name(values), values, overrides, apply_overrides(base, list(overrides))))
    names = [p.name for p in points]
    if len(set(names)) < len(names):  # e.g. "a/b" and "a_b" both become "a_b": add a digest to all
        points = [replace(p, name=f"{p.name}-{_digest(p.values)}") for p in points]
    return points
