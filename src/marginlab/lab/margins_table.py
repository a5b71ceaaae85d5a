"""The per-point margins table of ``marginlab margins --out DIR`` (``margins.csv`` or ``margins.parquet``):
one row per point, one column per estimator, written atomically, and read back by :func:`read_columns`.

Header: ``index``, ``label``, ``prediction``, then per estimator its margins as ``<estimator>[<domain>]``
(``crown[box]``, ``first-order[rd]``: :func:`margin_column`; the domain is ``box``, [0,1]^d, or ``rd``,
R^d) followed by its extra per-point columns as ``<estimator>.<column>`` (``mip.status``, ``mip.lower``:
:func:`extra_column`). :func:`read_columns` finds a margin column by the estimator's name alone, so
readers need not know the domain; :func:`read_domains` tells it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import atomic_write_text, atomic_write_with
from marginlab.base.tables import csv_text, read_csv
from marginlab.lab.names import MARGINS_TABLE

PARQUET_SUFFIX = ".parquet"


def margin_column(estimator: str, domain: str) -> str:
    """The header of an estimator's margins: ``"crown[box]"``, ``"exact-linear[rd]"``."""
    return f"{estimator}[{domain}]"


def extra_column(estimator: str, column: str) -> str:
    """The header of an estimator's extra per-point column: ``"mip.status"``."""
    return f"{estimator}.{column}"


def split_column(header: str) -> tuple[str, str | None]:
    """``"crown[box]"`` -> ``("crown", "box")``; any header without a domain -> ``(header, None)``."""
    if header.endswith("]") and "[" in header:
        name, _, domain = header[:-1].rpartition("[")
        return name, domain
    return header, None


def _find(header: Sequence[str], name: str) -> int | None:
    """Position of column ``name``: the header ``name`` itself, else the margins ``name[<domain>]``."""
    if name in header:
        return list(header).index(name)
    return next((j for j, h in enumerate(header) if split_column(h)[0] == name and h != name), None)


def table_path(out: Path, fmt: str) -> Path:
    """The per-point margins table in directory ``out``, as ``fmt`` (``csv`` or ``parquet``)."""
    return out / f"{MARGINS_TABLE}.{fmt}"


def check_format(fmt: str) -> None:
    """Refuse ``parquet`` in one line when pandas or pyarrow is missing (before any work is done)."""
    if fmt == "parquet":
        try:
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--format parquet needs pandas and pyarrow; install them or use csv") from None


def write_table(out: Path, columns: Mapping[str, Sequence[object]]) -> None:
    """Write the columns as CSV or Parquet, atomically (non-finite margins are written as inf / -inf)."""
    if out.suffix.lower() == PARQUET_SUFFIX:
        import pandas as pd

        frame = pd.DataFrame(columns)
        atomic_write_with(out, lambda f: frame.to_parquet(f, index=False))
        return
    rows = list(zip(*columns.values(), strict=True))
    atomic_write_text(out, csv_text(list(columns), [[_cell(v) for v in row] for row in rows]))


def _cell(v: object) -> object:
    return repr(v) if isinstance(v, float) else v


def read_columns(path: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The numeric columns ``names`` of a margins table (CSV or Parquet) as float64 arrays ``[N]``, keyed by
    the names asked for; an estimator's name finds its margins whatever their domain (``crown`` reads
    ``crown[box]``); a column the table does not have is left out (``inf``, ``-inf`` and ``nan`` cells read
    back as such)."""
    header, cells = _read(Path(path))
    out: dict[str, np.ndarray] = {}
    for name in names:
        j = _find(header, name)
        if j is None:
            continue
        try:
            out[name] = np.array(cells(j), dtype=np.float64)  # "inf", "nan" strings parse too
        except (IndexError, ValueError, TypeError):
            raise RunDirError(f"the margins table {path} is corrupt (column {name!r})") from None
    return out


def read_domains(path: str | Path) -> dict[str, str]:
    """``{estimator: domain}`` of the margin columns of a table (``{"crown": "box"}``)."""
    header, _ = _read(Path(path))
    return {name: domain for name, domain in map(split_column, header) if domain is not None}


def _read(path: Path) -> tuple[list[str], Callable[[int], list[object]]]:
    """The header of a margins table and a function giving column ``j``'s cells."""
    if path.suffix.lower() == PARQUET_SUFFIX:
        import pandas as pd

        frame = pd.read_parquet(path)
        return [str(c) for c in frame.columns], lambda j: frame.iloc[:, j].tolist()
    try:
        header, rows = read_csv(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"cannot read the margins table {path} ({type(e).__name__})") from None
    return list(header), lambda j: [row[j] for row in rows]
