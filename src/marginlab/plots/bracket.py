"""The bracket figure, drawn from the written margins table (its margin columns ``crown[<domain>]``,
``best[<domain>]`` and, when the exact margins were asked for, ``mip[<domain>]``; read by estimator name,
:func:`marginlab.lab.margins_table.read_columns`): points sorted by their attack upper bound, the band
[certified lower, upper] and the exact margins as dots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from marginlab.lab.margins_table import read_columns, read_domains
from marginlab.plots.common import new_figure, norm_name, save

LOWER, UPPER, EXACT = "crown", "best", "mip"  # the estimators of the table (marginlab.commands.bracket)


def plot_bracket(table: str | Path, path: str | Path, *, p: float, domain: str | None = None) -> Path:
    """Draw the brackets of the margins table ``table`` (``margins.csv`` or ``.parquet``) into ``path``:
    sorted points (by the upper bound) with the band [lower, upper] and the exact margins as dots.
    ``domain`` names the axis (``box`` or ``rd``); ``None``: the one the table's header states."""
    cols = read_columns(table, (LOWER, UPPER, EXACT))
    if domain is None:
        domain = read_domains(table).get(LOWER, "box")
    upper = cols[UPPER]
    exact = cols.get(EXACT, np.full_like(upper, np.nan))
    order = np.argsort(np.abs(upper), kind="stable")
    lo, up, ex = (np.abs(a)[order] for a in (cols[LOWER], upper, exact))
    idx = range(len(lo))
    fig, ax = new_figure(size=(5.5, 3.4))
    ax.fill_between(idx, lo, up, color="tab:blue", alpha=0.2, step="mid", label="bracket")
    ax.plot(idx, up, color="tab:red", lw=1, drawstyle="steps-mid", label="upper bound (best attack)")
    ax.plot(idx, lo, color="tab:green", lw=1, drawstyle="steps-mid", label="certified lower bound (crown)")
    if not np.isnan(ex).all():
        ax.plot(idx, ex, "k.", ms=3, label="exact (mip)")
    where = "$[0,1]^d$" if domain == "box" else "$\\mathbb{R}^d$"
    ax.set_xlabel("points, sorted by the upper bound")
    ax.set_ylabel(f"{norm_name(p)} margin over {where}")
    ax.legend(loc="upper left")
    return save(fig, path)
