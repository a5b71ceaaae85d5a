"""The records of a ``train`` run's ``metrics.jsonl``: what one tracked epoch holds, and how to read a
statistic back out of a list of them (:func:`series`).

Written by :mod:`marginlab.training.loop` and :mod:`marginlab.training.tracking`; read by the trends, the
figures and the report. A JSON file holds ``null`` where a statistic was not finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NotRequired, Required, TypedDict, cast

import torch

from marginlab.core.stats import margin_stats

__all__ = [
    "SPLITS",
    "BoundSummary",
    "EpochRecord",
    "MarginStat",
    "MarginSummary",
    "Split",
    "SplitRecord",
    "estimator_margins",
    "margin_summary",
    "recorded_kind",
    "series",
]

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
"""The tracked splits, in the order records and figures list them."""

MarginStat = Literal["min", "mean", "median", "q10", "q25", "q75", "q90", "max", "neg_share"]
"""A statistic of :func:`marginlab.core.stats.margin_stats` (its ``"tracking"`` form)."""


class MarginSummary(TypedDict):
    """One estimator's margins on a tracked subset: its kind (``"estimate"``, ``"upper bound"``...) and the
    statistics of :func:`marginlab.core.stats.margin_stats` (``"tracking"`` form) over the subset's
    per-point signed margins ``[n]``. A JSON file holds ``null`` where a statistic was not finite."""

    kind: str
    min: float
    mean: float
    median: float
    q10: float
    q25: float
    q75: float
    q90: float
    max: float
    neg_share: float


class BoundSummary(MarginSummary):
    """The tracked bound's :class:`MarginSummary`, plus ``n``: the points it ran on (``tracking.bound_n``)."""

    n: int


class SplitRecord(TypedDict):
    """What one tracked epoch records per split: subset size ``n``, mean cross-entropy ``loss`` and
    accuracy ``acc`` on the subset, and per estimator (and the tracked bound) its :class:`MarginSummary`;
    the output-space margins ``logit_margin`` (z_y - max_{j != y} z_j per point, misclassified negative)
    and ``normalised_margin`` (the same divided by the product of the layers' weight norms, the quantity
    the implicit-bias theory of homogeneous nets predicts to grow), both as ``margin_stats``."""

    n: int
    loss: float
    acc: float
    margins: dict[str, MarginSummary]
    logit_margin: NotRequired[dict[str, float]]
    normalised_margin: NotRequired[dict[str, float]]


class EpochRecord(TypedDict, total=False):
    """One line of a ``train`` run's ``metrics.jsonl``, as :func:`marginlab.training.loop.fit` writes it.

    ``epoch`` (0 = the untrained model) is always there; the training loop adds the epoch's training
    means (``train_loss_epoch``, ``train_objective_epoch``, ``train_acc_epoch``, and with regularizers
    ``regularizers_epoch``: each term's mean), ``step``, ``lr`` and wall-clock seconds ``time``
    (``train_s``, ``track_s``, maybe ``bound_s``); on tracked epochs the tracker adds a
    :class:`SplitRecord` per split."""

    epoch: Required[int]
    train_loss_epoch: float
    train_objective_epoch: float
    train_acc_epoch: float
    regularizers_epoch: dict[str, float]
    step: int
    lr: float
    train: SplitRecord
    test: SplitRecord
    time: dict[str, float]


def margin_summary(kind: str, m: torch.Tensor) -> MarginSummary:
    """``{"kind": kind, **margin_stats(m)}`` for per-point signed margins ``m [n]``, in that key order."""
    # margin_stats returns a plain dict whose keys (its "tracking" form) are exactly MarginSummary's others
    return cast(MarginSummary, {"kind": kind, **margin_stats(m)})


def series(
    records: Sequence[EpochRecord], split: Split, estimator: str, stat: MarginStat
) -> tuple[list[int], list[float]]:
    """``(epochs, values)`` of one margin statistic over the tracked epochs of ``records`` (epochs where
    it is missing or ``null`` left out)."""
    epochs: list[int] = []
    values: list[float] = []
    for r in records:
        m = estimator_margins(r, split, estimator)
        value = m.get(stat) if m is not None else None
        if value is not None:
            epochs.append(int(r["epoch"]))
            values.append(float(value))
    return epochs, values


def estimator_margins(record: EpochRecord, split: Split, estimator: str) -> MarginSummary | None:
    """``record[split]["margins"][estimator]``, or ``None`` where the epoch did not track it."""
    s = record.get(split)
    return s.get("margins", {}).get(estimator) if s is not None else None


def recorded_kind(
    records: Sequence[EpochRecord], estimator: str, splits: Sequence[Split] = SPLITS
) -> str | None:
    """The kind (``"estimate"``, ``"upper bound"``...) the first record tracking ``estimator`` on one of
    ``splits`` recorded for it; ``None`` if no record tracked it (or that record names no kind)."""
    for r in records:
        for split in splits:
            m = estimator_margins(r, split, estimator)
            if m is not None:
                kind = m.get("kind")
                return None if kind is None else str(kind)
    return None


def training_seconds(records: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """Wall and CPU seconds of training summed over the epochs of ``metrics.jsonl`` records
    (``time.train_s`` and ``time.train_cpu_s``; margin tracking is timed apart and left out). ``None``
    where a record lacks the time (an older run, or one from before CPU time was measured)."""
    times = [r.get("time") or {} for r in records if int(r.get("epoch", 0)) > 0]

    def total(key: str) -> float | None:
        values = [t.get(key) for t in times]
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        return sum(numbers) if numbers and len(numbers) == len(values) else None

    return total("train_s"), total("train_cpu_s")
