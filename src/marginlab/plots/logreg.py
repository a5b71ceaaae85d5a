"""Figures of a ``logreg-gd`` run, drawn from its run directory alone.

- ``margins.png``: minimum and mean signed L2 margin vs epoch (log x), train and test, with the margins
  of the two SVMs (classical, and bias penalised = GD's limit) as reference lines. The margins of a
  linear classifier have a closed form, so every margin in these figures is *exact* (over R^d), and the
  axes say so;
- ``cosine.png``: cosine between (w, b) and each SVM's (w, b) vs epoch;
- ``loss_error.png``: loss and error vs epoch (the poster: errors never rise, so no overfitting artefact);
- ``histograms.png``: per-point margins at the snapshot epochs, train and test;
- ``adversarial.png``: a few fixed test images, their minimal L2 perturbation and the adversarial image
  (closed form for a linear classifier) at the snapshot epochs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from marginlab.core.linear import minimal_adversarial
from marginlab.lab.names import (
    ADVERSARIAL_FIGURE,
    COSINE_FIGURE,
    FIGURES,
    HISTOGRAMS_FIGURE,
    LOSS_ERROR_FIGURE,
    MARGINS_FIGURE,
)
from marginlab.lab.readers import margins_files, read_adv_images, read_margins_file, read_metrics, read_svm
from marginlab.plots.common import SPLIT_COLORS, SPLIT_STYLE, fit_ylim, margin_label, new_figure, save, styled

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MARGIN_LABEL = margin_label("exact", 2)  # closed form of a linear classifier's margin, over R^d


@styled
def plot_logreg(run_dir: Path) -> list[Path]:
    """Draw every figure into ``run_dir/figures``; returns their paths (figures lacking data are skipped)."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    out = run_dir / FIGURES
    svm = _svm_margins(run_dir)
    paths = []
    if metrics:
        paths += [
            _margins(metrics, svm, out / MARGINS_FIGURE),
            _cosine(metrics, out / COSINE_FIGURE),
            _loss_error(metrics, out / LOSS_ERROR_FIGURE),
        ]
    snaps = _snapshots(run_dir)
    if snaps:
        paths.append(_histograms(snaps, svm.get("free"), out / HISTOGRAMS_FIGURE))
        images = read_adv_images(run_dir)
        if images is not None:
            shape = tuple(images["x"].shape[1:])
            paths.append(_adversarial(snaps, images, shape, out / ADVERSARIAL_FIGURE))
    return paths


def logreg_figures(run_dir: Path) -> list[str]:
    """The figures (names under ``figures/``) that :func:`plot_logreg` draws from the run's files, without
    drawing them (the same conditions: records, per-point snapshots, the fixed images): what a report
    expects to find on disk."""
    run_dir = Path(run_dir)
    names = [MARGINS_FIGURE, COSINE_FIGURE, LOSS_ERROR_FIGURE] if read_metrics(run_dir) else []
    if margins_files(run_dir):
        names.append(HISTOGRAMS_FIGURE)
        if read_adv_images(run_dir) is not None:
            names.append(ADVERSARIAL_FIGURE)
    return names


# -- reading ------------------------------------------------------------------------------------------
def _svm_margins(run_dir: Path) -> dict[str, float]:
    """Geometric margins of the SVMs: ``free`` (classical), ``regularized`` (bias penalised, GD's limit)."""
    z = read_svm(run_dir)
    if z is None:
        return {}
    return {k: float(z[f"{k}_margin"]) for k in ("free", "regularized") if f"{k}_margin" in z}


def _snapshots(run_dir: Path) -> list[dict[str, np.ndarray]]:
    snaps = []
    for path in margins_files(run_dir).values():
        snaps.append(read_margins_file(path))
    return sorted(snaps, key=lambda s: int(s["epoch"]))


def _series(metrics: Sequence[Mapping[str, object]], *keys: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and the value at the nested ``keys`` of each record (NaN where missing or null)."""
    epochs = np.array([m["epoch"] for m in metrics], dtype=float)
    vals = []
    for m in metrics:
        v: object = m
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        vals.append(np.nan if v is None else v)
    return epochs, np.asarray(vals, dtype=float)


# -- curves -------------------------------------------------------------------------------------------
def _margins(metrics: Sequence[Mapping[str, object]], svm: dict[str, float], path: Path) -> Path:
    """Left: the minimum margin with the SVMs' as reference; right: mean (and median) margin. Each
    panel's y-range is fitted to its curves (the SVM lines included on the left)."""
    fig, axes = new_figure(1, 2, size=(9.5, 3.6))
    ax_min, ax_mean = np.ravel(axes)
    mins, means = [], []
    for split, style in SPLIT_STYLE.items():
        mins.append(_series(metrics, split, "margin", "min"))
        ax_min.plot(*mins[-1], **style, label=split)
        means.append(_series(metrics, split, "margin", "mean"))
        ax_mean.plot(*means[-1], **style, label=f"{split} mean")
        means.append(_series(metrics, split, "margin", "median"))
        ax_mean.plot(*means[-1], color=style["color"], ls=":", lw=1.1, label=f"{split} median")
    if mins:
        epochs = mins[0][0][:1]
        mins += [(epochs, np.array([v])) for v in svm.values()]  # keep the SVM lines inside the range
    if "free" in svm:
        ax_min.axhline(svm["free"], color="k", ls="--", lw=1, label=f"SVM margin {svm['free']:.3f}")
    if "regularized" in svm:
        label = f"SVM, bias penalised {svm['regularized']:.3f}\n(GD's limit)"
        ax_min.axhline(svm["regularized"], color="k", ls=":", lw=1, label=label)
    ax_min.axhline(0, color="grey", lw=0.8)
    ax_min.set_title("minimum margin (the SVM's is the most it can reach)")
    ax_mean.set_title("mean and median margin")
    for ax, curves, where in ((ax_min, mins, "lower right"), (ax_mean, means, "best")):
        fit_ylim(ax, curves)
        ax.set_xscale("log")
        ax.set_xlabel("epoch (= full-batch GD step)")
        ax.set_ylabel(MARGIN_LABEL)
        ax.legend(loc=where)  # the minimum margin rises toward the SVM lines: keep the top clear
    fig.tight_layout()
    return save(fig, path)


def _cosine(metrics: Sequence[Mapping[str, object]], path: Path) -> Path:
    fig, ax = new_figure(size=(5.2, 3.5))
    ax.plot(*_series(metrics, "cos_svm_reg"), color="tab:green", label="SVM with bias penalised (GD's limit)")
    ax.plot(*_series(metrics, "cos_svm"), color="tab:purple", ls="--", label="classical SVM (free bias)")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cosine of (w, b) with the SVM's (exact)")
    ax.set_title("direction of GD vs the hard-margin SVM")
    ax.legend()
    fig.tight_layout()
    return save(fig, path)


def _loss_error(metrics: Sequence[Mapping[str, object]], path: Path) -> Path:
    fig, axes = new_figure(1, 2, size=(9, 3.3))
    ax_loss, ax_err = np.ravel(axes)
    for split, style in SPLIT_STYLE.items():
        ax_loss.plot(*_series(metrics, split, "loss"), **style, label=split)
        epochs, err = _series(metrics, split, "error")
        ax_err.plot(epochs, 100 * err, **style, label=split)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("mean logistic loss")
    ax_err.set_ylabel("error (%)")
    for ax in (ax_loss, ax_err):
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return save(fig, path)


# -- per-point views at the snapshot epochs -----------------------------------------------------------
def _histograms(snaps: list[dict[str, np.ndarray]], svm_margin: float | None, path: Path) -> Path:
    splits = [s for s in SPLIT_COLORS if s in snaps[0]]
    every = np.concatenate([s[split] for s in snaps for split in splits])
    lo, hi = np.percentile(every, [0.05, 100])
    bins = np.linspace(min(lo, 0.0), hi, 61)
    fig, axes = new_figure(len(snaps), len(splits), size=(4.4 * len(splits), 1.9 * len(snaps)))
    axes = np.asarray(axes).reshape(len(snaps), len(splits))
    for i, snap in enumerate(snaps):
        for j, split in enumerate(splits):
            ax, m = axes[i, j], snap[split]
            ax.hist(np.clip(m, bins[0], bins[-1]), bins=bins, color=SPLIT_COLORS[split], alpha=0.8)
            ax.axvline(float(np.mean(m)), color="k", lw=1, label=f"mean {np.mean(m):.2f}")
            if svm_margin is not None:
                ax.axvline(svm_margin, color="k", ls="--", lw=1, label=f"SVM {svm_margin:.2f}")
            ax.axvline(0, color="red", lw=0.8)
            ax.set_title(f"{split}, epoch {int(snap['epoch'])} (min {m.min():.2f})", fontsize=8)
            ax.legend(loc="upper right", fontsize=7)
            if i == len(snaps) - 1:
                ax.set_xlabel(MARGIN_LABEL)
            if j == 0:
                ax.set_ylabel("points")
    fig.tight_layout()
    return save(fig, path)


def _adversarial(
    snaps: list[dict[str, np.ndarray]], z: dict[str, np.ndarray], shape: tuple[int, ...], path: Path
) -> Path:
    x, y = torch.from_numpy(z["x"]).double().flatten(1), torch.from_numpy(z["y"]).double()
    names = (
        [f"{c} (y={s})" for c, s in zip(z["classes"], ("-1", "+1"), strict=True)] if "classes" in z else []
    )
    k, cols = len(y), 1 + 2 * len(snaps)
    fig, axes = new_figure(k, cols, size=(1.25 * cols, 1.7 * k))
    axes = np.asarray(axes).reshape(k, cols)
    for i in range(k):
        label = names[int(y[i] > 0)] if names else f"y={int(y[i]):+d}"
        _show(axes[i, 0], x[i], shape, f"original: {label}")
    for s, snap in enumerate(snaps):
        w, b = torch.from_numpy(snap["w"]).double(), float(snap["b"])
        found = minimal_adversarial(w, b, x, y, p=2)  # closed form, lands just across the boundary
        adv, delta = found.x, found.x - x  # [k, D]; misclassified points come back unchanged (δ = 0)
        for i in range(k):
            norm = float(found.norm[i])
            scale = float(delta[i].abs().max()) or 1.0
            _show(
                axes[i, 1 + 2 * s],
                delta[i] / scale,
                shape,
                f"ep {int(snap['epoch'])}: δ\n‖δ‖₂={norm:.2f}",
                "bwr",
                -1,
            )
            _show(axes[i, 2 + 2 * s], adv[i], shape, f"ep {int(snap['epoch'])}: x+δ")
    fig.suptitle("minimal L2 adversarial examples (δ rescaled to its max |value| for display)", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def _show(
    ax: Axes, v: torch.Tensor, shape: tuple[int, ...], title: str, cmap: str = "gray", vmin: float = 0
) -> None:
    img = v.reshape(shape).numpy()
    img = img[0] if img.shape[0] == 1 else np.transpose(np.clip(img, 0, 1), (1, 2, 0))
    ax.imshow(img, cmap=cmap, vmin=vmin, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()
