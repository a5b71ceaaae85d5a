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
from collections.abc import Iterable, Sequence
from typing import Any

MISSING = "–"  # what an absent or null value looks like in a table


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys, in insertion order; non-dict values are kept as-is."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def is_scalar(value: Any) -> bool:
    """True for values that fit one table cell: numbers, strings, booleans and ``None``."""
    return value is None or isinstance(value, bool | int | float | str)


def scalar_items(d: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of ``flatten(d)``."""
    return {k: v for k, v in flatten(d).items() if is_scalar(v)}


def shared_keys(dicts: Sequence[dict[str, Any]]) -> list[str]:
    """Keys present in every dict, in the order they first appear (empty when ``dicts`` is empty)."""
    if not dicts:
        return []
    common = set(dicts[0]).intersection(*dicts[1:])
    return [k for k in _ordered_union(dicts) if k in common]


def _ordered_union(dicts: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        seen.update(dict.fromkeys(d))
    return list(seen)


def union_keys(dicts: Sequence[dict[str, Any]]) -> list[str]:
    """Keys present in any dict, in the order they first appear."""
    return _ordered_union(dicts)


def format_cell(value: Any, max_len: int = 80) -> str:
    """A short human-readable cell: 4 significant digits for floats, compact JSON for lists/dicts."""
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
    return text if len(text) <= max_len else text[: max_len - 1] + "…"


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


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
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
