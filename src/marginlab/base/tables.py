"""Flat tables of run files: dotted keys, readable cells, Markdown and CSV text.

Summaries and metrics records are nested JSON. Reports and sweeps show them as flat tables whose columns
are dotted keys (``{"robust": {"acc": 0.9}}`` becomes ``robust.acc``); only scalar values (numbers,
strings, booleans, ``null``) make sensible comparison columns, lists are shown abbreviated.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MISSING = "–"  # what an absent or null value looks like in a table


def flatten(d: Mapping[str, object], prefix: str = "", *, lists: bool = False) -> dict[str, Any]:
    """Nested dicts to one level with dotted keys, in insertion order; non-dict values are kept as-is.

    With ``lists=True`` lists of dicts are flattened too, one index per item (``robust[0].eps``), so a
    table can show every number instead of one long JSON cell.
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted, lists=lists))
        elif lists and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{dotted}[{i}]", lists=lists))
        else:
            out[dotted] = value
    return out


def is_scalar(value: object) -> bool:
    """True for values that fit one table cell: numbers, strings, booleans and ``None``."""
    return value is None or isinstance(value, bool | int | float | str)


def scalar_items(d: Mapping[str, object]) -> dict[str, Any]:
    """The scalar entries of ``flatten(d)``."""
    return {k: v for k, v in flatten(d).items() if is_scalar(v)}


def shared_keys(dicts: Sequence[Mapping[str, object]]) -> list[str]:
    """Keys present in every dict, in the order they first appear (empty when ``dicts`` is empty)."""
    if not dicts:
        return []
    common = set(dicts[0]).intersection(*dicts[1:])
    return [k for k in _ordered_union(dicts) if k in common]


def _ordered_union(dicts: Iterable[Mapping[str, object]]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        seen.update(dict.fromkeys(d))
    return list(seen)


def union_keys(dicts: Sequence[Mapping[str, object]]) -> list[str]:
    """Keys present in any dict, in the order they first appear."""
    return _ordered_union(dicts)


def format_cell(value: object, max_len: int | None = 80) -> str:
    """A short human-readable cell: 4 significant digits for floats, compact JSON for lists/dicts;
    text longer than ``max_len`` is cut with "…" (``None``: never cut)."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, int | str):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    return text if max_len is None or len(text) <= max_len else text[: max_len - 1] + "…"


def split_pivot(
    items: Mapping[str, object], splits: Sequence[str] = ("train", "test")
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Separate the keys that name a split from the rest, to show them as one row with a column per split.

    A key names a split when one dotted part is the split (``margins.mlp.train.last.min``) or its first
    part starts with ``<split>_`` (``train_min_margin_last``); the row name is the key without it
    (``margins.mlp.last.min``, ``min_margin_last``). A row that only one split has stays in ``rest`` under
    its own key. Returns ``(rest, {row: {split: value}})``.
    """
    found = {key: _without_split(key, splits) for key in items}
    count = Counter(row for row, split in found.values() if split is not None and row)
    rest: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for key, value in items.items():
        row, split = found[key]
        if split is None or count[row] < 2:  # side by side only where two columns have a value
            rest[key] = value
        else:
            rows.setdefault(row, {})[split] = value
    return rest, rows


def _without_split(key: str, splits: Sequence[str]) -> tuple[str, str | None]:
    parts = key.split(".")
    for i, part in enumerate(parts):
        for split in splits:
            if part == split:
                return ".".join(parts[:i] + parts[i + 1 :]), split
            if i == 0 and part.startswith(split + "_"):
                return ".".join([part[len(split) + 1 :], *parts[1:]]), split
    return key, None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-style pipe table; ``|``, backticks, ``<``/``>`` and line breaks in cells are escaped."""
    lines = [_md_row(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [_md_row(row) for row in rows]
    return "\n".join(lines) + "\n"


_MD_CELL = re.compile(r"([\\`|<>])")


def _md_row(cells: Sequence[str]) -> str:
    # Escape what would break the table (|) or turn into markup or raw HTML (` < >); keep one line.
    escaped = (_MD_CELL.sub(r"\\\1", str(c).replace("\n", " ")) for c in cells)
    return "| " + " | ".join(escaped) + " |"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """CSV text (RFC 4180 quoting via the csv module) with a header line."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def read_csv(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of CSV text (empty header for empty text)."""
    rows = list(csv.reader(io.StringIO(text)))
    return (rows[0], rows[1:]) if rows else ([], [])
