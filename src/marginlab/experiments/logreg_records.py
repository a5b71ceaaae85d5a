"""What a ``logreg-gd`` run's files hold: one ``metrics.jsonl`` line per recorded epoch
(:class:`LogregRecord`) and its ``summary.json`` (:class:`LogregSummary`). Written by
:mod:`marginlab.experiments.logreg_gd`.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["LogregRecord", "LogregSummary", "SplitStats"]


# The records below are written as JSON in the order their keys are declared (the files keep that order);
# :mod:`marginlab.plots.logreg` and :mod:`marginlab.report.claims` read them back by these keys.
class SplitStats(TypedDict):
    """One split at one recorded epoch: mean logistic ``loss``, ``error`` (share of points with
    ``y(w·x+b) <= 0``) and the distribution of the exact signed L2 margins ``margin``
    (:func:`marginlab.core.stats.margin_stats`, ``"gd"`` form: ``min, mean, max, q10, q25, median, q75,
    q90``)."""

    loss: float
    error: float
    margin: dict[str, float]


class LogregRecord(TypedDict):
    """One line of a ``logreg-gd`` run's ``metrics.jsonl``: the ``epoch`` (= GD steps taken), ``‖w‖``,
    the bias ``b``, the cosines of (w, b) with the classical SVM's (``cos_svm``) and with the SVM whose bias
    is penalised (``cos_svm_reg``), and the :class:`SplitStats` of each split."""

    epoch: int
    w_norm: float
    b: float
    cos_svm: float
    cos_svm_reg: float
    train: SplitStats
    test: SplitStats


class LogregSummary(TypedDict):
    """``summary.json`` of a ``logreg-gd`` run (the runner puts ``kind`` in front): the problem and the
    step, the SVMs (``svm_*``: classical; ``svm_reg_*``: bias penalised), the first and last recorded epoch,
    and per split (:func:`trend_summary`) the first/last values and whether the trends hold, last record
    vs first. ``shows_tradeoff``: every ``*_rises``/``*_falls`` check of both splits holds."""

    dataset: str
    n_train: int
    n_test: int
    epochs: int
    L: float
    eta: float
    eta_times_L: float
    step_fraction: float
    normalized: bool
    svm_margin: float
    svm_reg_margin: float
    svm_n_support: int
    svm_seconds: float
    svm_reg_seconds: float
    gd_seconds: float
    device: str
    first_epoch: int
    last_epoch: int
    cos_svm_first: float
    cos_svm_last: float
    cos_svm_reg_first: float
    cos_svm_reg_last: float
    train_min_margin_first: float
    train_min_margin_last: float
    train_mean_margin_first: float
    train_mean_margin_last: float
    train_median_margin_first: float
    train_median_margin_last: float
    train_min_margin_best: float
    train_min_margin_rises: bool
    train_mean_margin_falls: bool
    train_loss_first: float
    train_loss_last: float
    train_error_first: float
    train_error_last: float
    train_mean_margin_falls_every_record: bool
    train_error_never_rises: bool
    train_cosine_rises: bool
    train_cosine_reg_rises: bool
    test_min_margin_first: float
    test_min_margin_last: float
    test_mean_margin_first: float
    test_mean_margin_last: float
    test_median_margin_first: float
    test_median_margin_last: float
    test_min_margin_best: float
    test_min_margin_rises: bool
    test_mean_margin_falls: bool
    test_loss_first: float
    test_loss_last: float
    test_error_first: float
    test_error_last: float
    test_mean_margin_falls_every_record: bool
    test_error_never_rises: bool
    test_cosine_rises: bool
    test_cosine_reg_rises: bool
    shows_tradeoff: bool
