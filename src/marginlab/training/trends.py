"""Margin trends of a run: did the minimum margin rise and the mean margin fall, and where not?

Computed from the metric records (and, for the share of points pushed toward the boundary, from the
per-point margins kept in ``margins/*.npz``), so a summary can be rebuilt from the run's files alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NotRequired, TypedDict

import numpy as np

from marginlab.training.records import SPLITS, EpochRecord, Split, recorded_kind, series
from marginlab.training.tracking import load_points

DEFINITIONS = {
    "init": "epoch 0: the randomly initialised model, before any training",
    "first": "the first tracked epoch after training started (epoch 1): the baseline of the trends",
    "min_margin_rises": "min margin at the last epoch > min margin at 'first' (signed: all points)",
    "mean_margin_falls": "mean margin at the last epoch < mean margin at 'first'",
    "mean_margin_falls_after_peak": "mean margin at the last epoch < its peak over the epochs >= 1",
    "share_closer": "share of the tracked points whose margin at the last epoch is below that at 'first' "
    "(from the saved per-point margins)",
    "interpolation": f"the first tracked epoch whose training-subset accuracy is >= {0.99:.0%}: the regime "
    "of the trade-off (the training set is fit); the '*_after_interpolation' trends start there",
}
INTERPOLATION_ACC = 0.99


class TrendPoint(TypedDict):
    """The minimum and mean margin of a subset at one tracked ``epoch``."""

    epoch: int
    min: float
    mean: float


class PeakMean(TypedDict):
    """The tracked epoch (>= 1) with the highest mean margin, and that mean."""

    epoch: int
    mean: float


class AfterInterpolation(TypedDict):
    """The trends from the interpolation epoch on (see :data:`DEFINITIONS`); ``interpolation`` is ``None``
    (and the two trends are absent) when the training subset was never fit before the last epoch."""

    interpolation: TrendPoint | None
    min_margin_rises_after_interpolation: NotRequired[bool]
    mean_margin_falls_after_interpolation: NotRequired[bool]


class SplitTrends(AfterInterpolation):
    """One estimator's trends on one split (the keys are defined in :data:`DEFINITIONS`); ``init`` is
    ``None`` when epoch 0 was not tracked, ``share_closer`` when the per-point margins were not kept."""

    init: TrendPoint | None
    first: TrendPoint
    peak_mean: PeakMean
    last: TrendPoint
    min_margin_rises: bool
    mean_margin_falls: bool
    mean_margin_falls_after_peak: bool
    share_closer: float | None


class EstimatorTrends(TypedDict, total=False):
    """One estimator's margin ``kind`` and its :class:`SplitTrends` per split (only the splits it was
    tracked on after training started; no key at all when there were none)."""

    kind: str
    train: SplitTrends
    test: SplitTrends


class MarginTrends(TypedDict):
    """:func:`margin_trends`: per estimator its trends, the trends in words, and what each key means."""

    margins: dict[str, EstimatorTrends]
    findings: list[str]
    definitions: dict[str, str]


def margin_trends(
    records: Sequence[EpochRecord], run_dir: str | Path | None, estimators: Sequence[str]
) -> MarginTrends:
    """Per estimator and split: first / peak / last min and mean margins and whether the trends hold.

    Returns ``{"margins": {name: {"kind", "train": {...}, "test": {...}}}, "findings": [str],
    "definitions": {...}}``; ``findings`` states each trend in words, including where it does not hold.
    """
    points = load_points(run_dir) if run_dir is not None else {}
    margins: dict[str, EstimatorTrends] = {}
    findings: list[str] = []
    for name in estimators:
        entry: EstimatorTrends = {}
        for split in SPLITS:
            ep, mins, means = _min_mean(records, split, name)
            trained = [i for i, e in enumerate(ep) if e >= 1]
            if not trained:
                continue
            kind = entry.setdefault("kind", recorded_kind(records, name, (split,)) or "unknown")
            i0, i1 = trained[0], trained[-1]
            ipk = max(trained, key=lambda i: means[i])
            t: SplitTrends = {
                "init": {"epoch": ep[0], "min": mins[0], "mean": means[0]} if ep[0] == 0 else None,
                "first": {"epoch": ep[i0], "min": mins[i0], "mean": means[i0]},
                "peak_mean": {"epoch": ep[ipk], "mean": means[ipk]},
                "last": {"epoch": ep[i1], "min": mins[i1], "mean": means[i1]},
                "min_margin_rises": mins[i1] > mins[i0],
                "mean_margin_falls": means[i1] < means[i0],
                "mean_margin_falls_after_peak": means[i1] < means[ipk],
                "share_closer": _share_closer(points, split, name, ep[i0], ep[i1]),
                **_after_interpolation(records, ep, mins, means, trained),
            }
            entry[split] = t
            findings.append(_finding(name, kind, split, t))
        margins[name] = entry
    return {"margins": margins, "findings": findings, "definitions": DEFINITIONS}


def _min_mean(
    records: Sequence[EpochRecord], split: Split, name: str
) -> tuple[list[int], list[float], list[float]]:
    """``(epochs, mins, means)`` over the epochs where both the min and the mean margin are known.

    Records read back from ``metrics.jsonl`` (a resumed run) hold ``null`` where a statistic was not
    finite; taking the two statistics over the same epochs keeps them aligned (an epoch whose min is known
    but whose mean is not is left out of both), never pairing one epoch's min with another's mean.
    """
    ep_min, mins = series(records, split, name, "min")
    ep_mean, means = series(records, split, name, "mean")
    mean_at = dict(zip(ep_mean, means, strict=True))
    both = [(e, m) for e, m in zip(ep_min, mins, strict=True) if e in mean_at]
    return [e for e, _ in both], [m for _, m in both], [mean_at[e] for e, _ in both]


def _after_interpolation(
    records: Sequence[EpochRecord], ep: list[int], mins: list[float], means: list[float], trained: list[int]
) -> AfterInterpolation:
    """The trends from the first epoch the training subset is (nearly) fit to the last one."""
    acc = {int(r["epoch"]): _train_acc(r) for r in records}
    fit = [i for i in trained if (acc.get(ep[i]) or 0.0) >= INTERPOLATION_ACC]
    if not fit or fit[0] == trained[-1]:
        return {"interpolation": None}
    i0, i1 = fit[0], trained[-1]
    return {
        "interpolation": {"epoch": ep[i0], "min": mins[i0], "mean": means[i0]},
        "min_margin_rises_after_interpolation": mins[i1] > mins[i0],
        "mean_margin_falls_after_interpolation": means[i1] < means[i0],
    }


def _train_acc(record: EpochRecord) -> float | None:
    train = record.get("train")
    return train.get("acc") if train is not None else None


def _share_closer(
    points: dict[int, dict[str, dict[str, np.ndarray]]], split: str, name: str, e0: int, e1: int
) -> float | None:
    try:
        a, b = points[e0][split][name], points[e1][split][name]
    except KeyError:
        return None
    return float(np.mean(b < a)) if e1 > e0 and len(a) == len(b) and len(a) else None


def _finding(name: str, kind: str, split: str, t: SplitTrends) -> str:
    f, last, pk = t["first"], t["last"], t["peak_mean"]
    rises = "rises" if t["min_margin_rises"] else "does NOT rise"
    falls = "falls" if t["mean_margin_falls"] else "does NOT fall"
    text = (
        f"{name} ({kind}), {split}: min margin {rises} ({f['min']:.4g} -> {last['min']:.4g}), "
        f"mean margin {falls} ({f['mean']:.4g} -> {last['mean']:.4g}) "
        f"over epochs {f['epoch']}->{last['epoch']}"
    )
    if not t["mean_margin_falls"] and t["mean_margin_falls_after_peak"]:
        text += f"; it peaked at epoch {pk['epoch']} ({pk['mean']:.4g}) and fell after"
    ip = t.get("interpolation")
    if ip is not None:
        rises = "rises" if t["min_margin_rises_after_interpolation"] else "does NOT rise"
        falls = "falls" if t["mean_margin_falls_after_interpolation"] else "does NOT fall"
        text += (
            f"; after interpolation (epoch {ip['epoch']}) the min margin {rises} ({ip['min']:.4g} -> "
            f"{last['min']:.4g}) and the mean {falls} ({ip['mean']:.4g} -> {last['mean']:.4g})"
        )
    else:
        text += "; the training subset was never fit (no interpolation epoch before the last)"
    if t["share_closer"] is not None:
        text += f"; {100 * t['share_closer']:.0f}% of the points moved closer to the boundary"
    return text
