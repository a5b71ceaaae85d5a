"""Shared plotting helpers: a headless backend, consistent styling, atomic saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from marginlab.fsio import atomic_savefig  # noqa: E402

STYLE: dict[str, Any] = {
    "figure.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "legend.fontsize": 8,
}


def new_figure(
    nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] | None = None
) -> tuple[Figure, Any]:
    """A figure and its axes (squeezed like ``plt.subplots``) in the project style."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=size or (4.2 * ncols, 3.2 * nrows), squeeze=False)
    return fig, axes if nrows * ncols > 1 else axes[0, 0]


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` atomically (PNG by suffix) and close it, returning the path."""
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)
