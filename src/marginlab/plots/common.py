"""The one place that sets how every figure looks, plus the helpers every figure shares.

- ``STYLE``: font sizes, grid, colour cycle, line widths and dpi; :func:`styled` applies it while a
  figure is drawn (titles and labels read the style when they are created, not when the figure is);
- ``SPLIT_STYLE`` / ``recipe_style``: train vs test and the regularizer recipes differ in hue *and* line
  style, so they stay apart in grayscale prints and for colour-blind readers;
- :func:`margin_label`: every margin axis names the quantity, its norm and its kind (exact, estimate,
  upper bound, lower bound), because the estimators disagree by factors and a reader must know which
  number is which;
- :func:`fit_ylim`: y-ranges fitted to the trained epochs, so the untrained model (epoch 0, often an
  order of magnitude away) cannot flatten the trends the figure is about.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypedDict, TypeVar

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from cycler import cycler  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from marginlab.base.fsio import atomic_savefig  # noqa: E402
from marginlab.core.norms import Norm  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.typing import RcKeyType

PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray")
DPI = 110

STYLE: dict[RcKeyType, object] = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.framealpha": 0.85,
    "figure.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=list(PALETTE)),
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
}


class LineStyle(TypedDict):
    """Keyword arguments of ``Axes.plot`` (and ``hist``) that tell curves apart: colour and line style."""

    color: str
    linestyle: str | tuple[int, tuple[int, ...]]


# Train solid blue, test dashed orange: different hue, lightness and dash pattern.
SPLIT_STYLE: dict[str, LineStyle] = {
    "train": {"color": "tab:blue", "linestyle": "-"},
    "test": {"color": "tab:orange", "linestyle": "--"},
}
SPLIT_COLORS = {split: style["color"] for split, style in SPLIT_STYLE.items()}

_RECIPE_STYLE: dict[str, LineStyle] = {
    "standard": {"color": "tab:blue", "linestyle": "-"},
    "constraint": {"color": "tab:green", "linestyle": "--"},
    "regularized": {"color": "tab:red", "linestyle": "-."},
}
_SPARE_DASHES: tuple[str | tuple[int, tuple[int, ...]], ...] = ((0, (1, 1)), (0, (5, 1, 1, 1)), ":")
_SPARE_STYLES: list[LineStyle] = [
    {"color": c, "linestyle": ls}
    # a comparison of every training recipe has six beyond the reference's three
    for c, ls in zip(
        (*PALETTE[4:], "tab:pink", "tab:olive", "tab:cyan"), (*_SPARE_DASHES, "-", "--", "-."), strict=True
    )
]

P = ParamSpec("P")
R = TypeVar("R")


def styled(func: Callable[P, R]) -> Callable[P, R]:
    """Draw ``func``'s figures in :data:`STYLE` (without changing the caller's matplotlib settings)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with plt.rc_context(STYLE):
            return func(*args, **kwargs)

    return wrapper


def recipe_style(recipe: str, known: Sequence[str] = ()) -> LineStyle:
    """Colour and line style of a regularizer recipe; unknown recipes get spare ones by their position."""
    if recipe in _RECIPE_STYLE:
        return _RECIPE_STYLE[recipe].copy()
    others = [r for r in known if r not in _RECIPE_STYLE]
    i = others.index(recipe) if recipe in others else 0
    return _SPARE_STYLES[i % len(_SPARE_STYLES)].copy()


def norm_name(p: Norm | float | str | None) -> str:
    """How figures name a norm (:attr:`Norm.symbol`): ``2.0``/``"L2"`` -> ``"L2"``, ``inf``/``"inf"`` ->
    ``"L∞"``, ``1`` -> ``"L1"``; ``None`` gives ``""``."""
    return "" if p is None else Norm.parse(p).symbol


def margin_label(kind: str | None, p: float | str | None = None, what: str = "margin") -> str:
    """An axis label that names the quantity and its kind: ``"signed L2 margin (estimate)"``."""
    norm = norm_name(p)
    return f"signed {norm + ' ' if norm else ''}{what} ({kind or 'kind unknown'})"


def fit_ylim(
    ax: Axes,
    curves: Iterable[tuple[Iterable[float], Iterable[float]]],
    *,
    from_epoch: int = 1,
    pad: float = 0.08,
) -> bool:
    """Fit ``ax``'s y-range to the points of ``curves`` (``(epochs, values)`` pairs) at epochs
    ``>= from_epoch``, when there are any; returns True when some drawn point now lies off the axes
    (a small note on the axes says so, so no reader mistakes the range for the whole story)."""
    kept: list[float] = []
    left_out: list[float] = []
    for epochs, values in curves:
        for e, v in zip(epochs, values, strict=True):
            if v is not None and np.isfinite(v):
                (kept if e >= from_epoch else left_out).append(float(v))
    if not kept:
        return False
    lo, hi = min(kept), max(kept)
    margin = pad * (hi - lo) or pad * abs(hi) or pad
    lo, hi = lo - margin, hi + margin
    ax.set_ylim(lo, hi)
    off = any(v < lo or v > hi for v in left_out)
    if off:
        note = "epoch 0 lies off the y-range" if from_epoch == 1 else f"epochs < {from_epoch} may lie off"
        ax.text(0.99, 0.01, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.35")
    return off


def shared_bins(arrays: Iterable[np.ndarray], n: int = 40) -> np.ndarray | None:
    """``n + 1`` histogram bin edges shared by ``arrays`` (their finite values), from the 0.5% and 99.5%
    quantiles so that one outlier cannot squash the others; ``None`` when no array has a finite value."""
    finite = [a[np.isfinite(a)] for a in arrays]
    if not any(len(a) for a in finite):
        return None
    lo, hi = np.quantile(np.concatenate(finite), [0.005, 0.995])
    return np.linspace(lo, hi if hi > lo else lo + 1e-6, n + 1)


def new_figure(
    nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] | None = None
) -> tuple[Figure, Any]:
    """A figure and its axes (squeezed like ``plt.subplots``) in the project style."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=size or (4.2 * ncols, 3.2 * nrows), squeeze=False)
    return fig, axes if nrows * ncols > 1 else axes[0, 0]


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` atomically (PNG by suffix) at the project's dpi and close it, returning the path."""
    try:
        return atomic_savefig(fig, path, dpi=DPI)
    finally:
        plt.close(fig)
