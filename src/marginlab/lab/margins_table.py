"""The per-point margins table of ``marginlab margins --out DIR`` (``margins.csv`` or ``margins.parquet``):
one row per point, one column per estimator, written atomically, and read back by :func:`read_columns`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import atomic_write_text, atomic_write_with
from marginlab.base.tables import csv_text, read_csv
from marginlab.lab.names import MARGINS_TABLE

PARQUET_SUFFIX = ".parquet"


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
    """The numeric columns ``names`` of a margins table (CSV or Parquet) as float64 arrays ``[N]``; a
    column the table does not have is left out (``inf``, ``-inf`` and ``nan`` cells read back as such)."""
    path = Path(path)
    if path.suffix.lower() == PARQUET_SUFFIX:
        import pandas as pd

        frame = pd.read_parquet(path)
        return {n: frame[n].to_numpy(dtype=np.float64) for n in names if n in frame.columns}
    try:
        header, rows = read_csv(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"cannot read the margins table {path} ({type(e).__name__})") from None
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name in header:
            j = header.index(name)
            try:
                out[name] = np.array([float(row[j]) for row in rows], dtype=np.float64)
            except (IndexError, ValueError):
                raise RunDirError(f"the margins table {path} is corrupt (column {name!r})") from None
    return out
