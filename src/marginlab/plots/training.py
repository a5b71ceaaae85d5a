"""Figures of a ``train`` run, drawn from its files alone (``metrics.jsonl`` and ``margins/*.npz``).

- ``margins.png``: per estimator, the minimum, mean and median (with the 10-90% band) margin vs epoch,
  train and test: the poster's "min margin rises, average margin falls" panels;
- ``histograms.png``: margin histograms at several epochs, train and test, on bins shared by all
  epochs shown so they are comparable (the poster's histogram panels);
- ``loss_accuracy.png``: training loss and accuracy curves.

The ``draw_*`` helpers take records, so other experiments (the regularizer comparison) can overlay runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from marginlab.lab.names import FIGURES, HISTOGRAMS_FIGURE, LOSS_ACCURACY_FIGURE, MARGINS_FIGURE, METRICS
from marginlab.lab.readers import margins_files, read_config, read_metrics
from marginlab.plots.common import SPLIT_COLORS, SPLIT_STYLE, fit_ylim, margin_label, new_figure, save, styled
from marginlab.training.records import (
    SPLITS,
    EpochRecord,
    MarginStat,
    Split,
    estimator_margins,
    recorded_kind,
)
from marginlab.training.tracking import load_points

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "SPLIT_COLORS",
    "draw_series",
    "estimator_names",
    "gapped_series",
    "kind_of",
    "plot_training",
    "training_figures",
]

STAT_TITLES: dict[MarginStat, str] = {
    "min": "minimum margin",
    "mean": "mean margin",
    "median": "median margin (10-90% band)",
}


@styled
def plot_training(run_dir: str | Path) -> list[Path]:
    """Draw every figure of the run into ``run_dir/figures``; returns the files written."""
    run_dir = Path(run_dir)
    records = cast("list[EpochRecord]", read_metrics(run_dir))  # a train run's metrics.jsonl
    cfg = read_config(run_dir)
    title = f"{cfg.get('model', {}).get('name', '?')} on {cfg.get('data', {}).get('dataset', '?')}"
    p = cfg.get("tracking", {}).get("p")
    # a run tracked on a log grid of steps (tracking.every = "log") is drawn on a log step axis
    x: XAxis = "step" if cfg.get("tracking", {}).get("every") == "log" else "epoch"
    figures = run_dir / FIGURES
    out = []
    names = estimator_names(records)
    drawn = _training_figures(records, names, run_dir)
    if MARGINS_FIGURE in drawn:
        out.append(plot_margin_curves(records, names, figures / MARGINS_FIGURE, title, p=p, x=x))
    if HISTOGRAMS_FIGURE in drawn:
        points = load_points(run_dir)
        kinds = {name: kind_of(records, name) for name in names}
        out.append(plot_histograms(points, names, figures / HISTOGRAMS_FIGURE, title, kinds=kinds, p=p))
    if LOSS_ACCURACY_FIGURE in drawn:
        out.append(plot_loss_accuracy(records, figures / LOSS_ACCURACY_FIGURE, title, x=x))
    return out


def training_figures(run_dir: str | Path) -> list[str]:
    """The figures (names under ``figures/``) that :func:`plot_training` draws from the run's files, without
    drawing them: what a report expects to find on disk."""
    run_dir = Path(run_dir)
    records = cast("list[EpochRecord]", read_metrics(run_dir))
    return _training_figures(records, estimator_names(records), run_dir)


def _training_figures(records: Sequence[EpochRecord], names: list[str], run_dir: Path) -> list[str]:
    """One rule for what is drawn, shared by :func:`plot_training` and :func:`training_figures`."""
    out = [MARGINS_FIGURE] if names else []
    if names and margins_files(run_dir):  # the per-point snapshots the histograms are drawn from
        out.append(HISTOGRAMS_FIGURE)
    if any("train_loss_epoch" in r or "test" in r for r in records):
        out.append(LOSS_ACCURACY_FIGURE)
    return out


def estimator_names(records: Sequence[EpochRecord]) -> list[str]:
    """The estimators tracked in ``records``, in the order first seen."""
    names: list[str] = []
    for r in records:
        for split in SPLITS:
            s = r.get(split)
            for name in s.get("margins", {}) if s is not None else {}:
                if name not in names:
                    names.append(name)
    return names


def kind_of(records: Sequence[EpochRecord], name: str) -> str:
    """The kind (``"estimate"``, ``"upper bound"``...) recorded for estimator ``name``; ``"?"`` if none."""
    return recorded_kind(records, name) or "?"


XAxis = Literal["epoch", "step"]
"""What a training curve is drawn against: the epoch, or the optimizer step (on a log scale)."""


def set_x_axis(ax: Axes, x: XAxis) -> None:
    """Label the x axis; a step axis is logarithmic (symlog, so the untrained model at step 0 stays)."""
    if x == "step":
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)  # steps are never negative: no empty mirror half
        ax.set_xlabel("optimizer step (log scale)")
    else:
        ax.set_xlabel("epoch")


def gapped_series(
    records: Sequence[EpochRecord], split: Split, name: str, stat: MarginStat, x: XAxis = "epoch"
) -> tuple[list[int], list[float]]:
    """``(epochs, values)`` of one margin statistic over every epoch that recorded estimator ``name`` on
    ``split``, with NaN where the statistic is ``null`` (it was not finite, e.g. ``+inf`` from a failed
    attack: JSON has no infinity). Unlike :func:`~marginlab.training.tracking.series`, which leaves such
    epochs out, the NaN keeps their place, so a line drawn through the values breaks there instead of
    joining its neighbours; epochs that did not measure ``name`` at all (a bound measured every k-th
    epoch) are still left out. Every statistic of one estimator has the same epochs. ``x="step"`` gives
    each record's optimizer step instead of its epoch."""
    epochs: list[int] = []
    values: list[float] = []
    for r in records:
        m = estimator_margins(r, split, name)
        if m is not None:
            value = m.get(stat)
            epochs.append(_x(r, x))
            values.append(math.nan if value is None else float(value))
    return epochs, values


def draw_series(
    ax: Axes,
    records: Sequence[EpochRecord],
    split: Split,
    name: str,
    stat: MarginStat,
    x: XAxis = "epoch",
    **kw: Any,
) -> tuple[list[int], list[float]]:
    """One margin statistic vs epoch (or step, ``x``); ``stat="median"`` also shades the 10-90% band.

    Values recorded as ``null`` (not finite) are NaN gaps in the line and the band (see
    :func:`gapped_series`), never joined over or filled in, and the axes say so in a small note; a
    band edge point with no finite neighbour is drawn as a vertical bar, a line point as a marker.
    Returns every ``(epochs, values)`` drawn (the band's edges included; NaN at the gaps) for
    :func:`fit_ylim`.
    """
    epochs, values = gapped_series(records, split, name, stat, x)
    if not epochs:
        return [], []
    gaps = any(math.isnan(v) for v in values)
    (line,) = ax.plot(epochs, values, marker="." if len(epochs) < 30 or gaps else None, **kw)
    if stat != "median":
        if gaps:
            _note_not_finite(ax)
        return epochs, values
    _, q10 = gapped_series(records, split, name, "q10", x)
    _, q90 = gapped_series(records, split, name, "q90", x)
    finite = np.isfinite(q10) & np.isfinite(q90)  # [len(epochs)]
    color = line.get_color()
    # fill_between masks the NaN epochs itself: the band breaks there
    ax.fill_between(epochs, q10, q90, color=color, alpha=0.15, linewidth=0)
    prev = np.concatenate([[False], finite[:-1]])
    after = np.concatenate([finite[1:], [False]])
    alone = finite & ~prev & ~after  # a one-epoch band has no width: a bar shows it
    if alone.any():
        at, lo, hi = (np.asarray(a)[alone] for a in (epochs, q10, q90))
        ax.vlines(at, lo, hi, color=color, alpha=0.35, linewidth=3)
    if gaps or not finite.all():
        _note_not_finite(ax)
    return epochs * 3, values + q10 + q90


NOT_FINITE_NOTE = f"gaps: not finite (null in {METRICS})"


def _note_not_finite(ax: Axes) -> None:
    """Say on ``ax`` (once) that some drawn statistics were not finite and are gaps."""
    if not any(t.get_text() == NOT_FINITE_NOTE for t in ax.texts):
        ax.text(
            0.01, 0.99, NOT_FINITE_NOTE, transform=ax.transAxes, ha="left", va="top", fontsize=7, color="0.35"
        )


def plot_margin_curves(
    records: Sequence[EpochRecord],
    names: list[str],
    path: Path,
    title: str,
    *,
    p: float | None = None,
    x: XAxis = "epoch",
) -> Path:
    """Rows: estimators; columns: min, mean, median margin vs epoch (or log step, ``x``); train and test
    in each panel.

    Each panel's y-range is fitted to the trained epochs (>= 1): the untrained model's margins are
    often far below the rest and would flatten the fall of the mean margin that the figure is about.
    """
    stats = list(STAT_TITLES)
    fig, axes = new_figure(len(names), len(stats), size=(4.0 * len(stats), 3.1 * len(names)))
    axes = np.asarray(axes).reshape(len(names), len(stats))
    for i, name in enumerate(names):
        label = margin_label(kind_of(records, name), p)
        for j, stat in enumerate(stats):
            ax = axes[i, j]
            drawn = [
                draw_series(ax, records, split, name, stat, x, label=split, **SPLIT_STYLE[split])
                for split in SPLITS
            ]
            fit_ylim(ax, drawn)
            ax.set_title(f"{STAT_TITLES[stat]}: {name}")
            set_x_axis(ax, x)
            ax.set_ylabel(label)
            ax.axhline(0.0, color="0.5", linewidth=0.6)
            if any(drawn_epochs for drawn_epochs, _ in drawn):
                ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def pick_epochs(available: list[int], k: int = 4) -> list[int]:
    """Up to ``k`` epochs spread over ``available`` (skipping the initial epoch 0 when others exist)."""
    trained = [e for e in sorted(available) if e > 0] or sorted(available)
    if len(trained) <= k:
        return trained
    idx = np.unique(np.round(np.linspace(0, len(trained) - 1, k)).astype(int))
    return [trained[i] for i in idx]


def plot_histograms(
    points: dict[int, dict[str, dict[str, np.ndarray]]],
    names: list[str],
    path: Path,
    title: str,
    *,
    kinds: dict[str, str] | None = None,
    p: float | None = None,
) -> Path:
    """Rows: estimators; columns: train, test; step histograms at a few epochs on shared bins."""
    epochs = pick_epochs(list(points))
    fig, axes = new_figure(len(names), len(SPLITS), size=(4.6 * len(SPLITS), 3.0 * len(names)))
    axes = np.asarray(axes).reshape(len(names), len(SPLITS))
    cmap = __import__("matplotlib").colormaps["viridis"]
    for i, name in enumerate(names):
        for j, split in enumerate(SPLITS):
            ax = axes[i, j]
            arrays = {e: points[e][split][name] for e in epochs if name in points[e].get(split, {})}
            if not arrays:
                ax.set_visible(False)
                continue
            # ±inf margins (failed attacks) have no place on the axis: left out, and counted in the legend
            finite = {e: a[np.isfinite(a)] for e, a in arrays.items()}
            pooled = np.concatenate(list(finite.values()))
            if not len(pooled):
                ax.text(0.5, 0.5, "no finite margins", transform=ax.transAxes, ha="center", va="center")
                ax.set_title(f"{split}: {name} margin")
                continue
            # shared bins over every epoch shown, from robust quantiles so one outlier cannot squash them
            lo, hi = np.quantile(pooled, [0.005, 0.995])
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
            for c, (e, a) in enumerate(finite.items()):
                color = cmap(c / max(len(arrays) - 1, 1))
                left_out = len(arrays[e]) - len(a)
                label = f"epoch {e}" + (
                    f" ({left_out} of {len(arrays[e])} not finite, not drawn)" if left_out else ""
                )
                ax.hist(np.clip(a, lo, hi), bins=bins, histtype="step", color=color, label=label)
            ax.axvline(0.0, color="0.5", linewidth=0.6)
            ax.set_title(f"{split}: {name} margin")
            kind = (kinds or {}).get(name)
            ax.set_xlabel(margin_label(kind, p) + ", clipped to its 0.5-99.5% range")
            ax.set_ylabel("points")
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def plot_loss_accuracy(records: Sequence[EpochRecord], path: Path, title: str, x: XAxis = "epoch") -> Path:
    """Loss (left) and accuracy (right) vs epoch (or log step, ``x``): the epoch's running training
    average and the subsets."""
    fig, axes = new_figure(1, 2)
    ax_l, ax_a = np.asarray(axes).ravel()
    epoch_means: tuple[tuple[Literal["train_loss_epoch", "train_acc_epoch"], Axes, str | None], ...] = (
        ("train_loss_epoch", ax_l, "train (epoch average)"),  # the running average over the epoch's batches
        ("train_acc_epoch", ax_a, None),
    )
    for key, ax, label in epoch_means:
        pts = [(_x(r, x), r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(
                *zip(*pts, strict=True), color="0.3", linestyle="--", label=label or "train (epoch average)"
            )
    subset_values: tuple[tuple[Literal["loss", "acc"], Axes], ...] = (("loss", ax_l), ("acc", ax_a))
    for split in SPLITS:
        for stat, ax in subset_values:
            pts = [(_x(r, x), v) for r in records if (v := _subset_value(r, split, stat)) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), **SPLIT_STYLE[split], label=f"{split} (tracked subset)")
    ax_l.set_yscale("log")
    for ax, name in ((ax_l, "cross-entropy loss"), (ax_a, "accuracy")):
        set_x_axis(ax, x)
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def _subset_value(record: EpochRecord, split: Split, key: Literal["loss", "acc"]) -> float | None:
    """``record[split][key]``, or ``None`` where the epoch was not tracked."""
    s = record.get(split)
    return s.get(key) if s is not None else None


def _x(record: EpochRecord, x: XAxis) -> int:
    """The record's epoch, or its optimizer step (``x="step"``; a record without one: its epoch)."""
    return int(record.get("step", record["epoch"])) if x == "step" else int(record["epoch"])
