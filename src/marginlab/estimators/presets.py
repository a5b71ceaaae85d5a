"""The default attack sets, per norm: the one table that says which minimum-norm attacks run when the
user names none.

- ``best``: the attacks the ``best`` estimator combines (its per-point minimum). DDN and FMN for L2: on
  trained MNIST nets each alone is within 1% of a 1000-step reference at the median, but each misses on
  different points (FMN's 90th percentile is 4-10% above it); their per-point minimum is within 1% on
  97-98% of points, for the cost DeepFool + DDN had (benchmarks/bench_bounds.py). For L∞, where DDN has no
  mode: FMN and DeepFool.
- ``bracket``: the attacks of a margin bracket's upper end (:mod:`marginlab.estimators.bracket`):
  DeepFool + DDN for L2, DeepFool + FMN for L∞.
- ``prepass_bound``: the minimum-norm estimator of the robustness evaluation's bound pre-pass
  (``RobustnessSettings(bound="auto")``): DDN for L2, FMN for L∞.
"""

from __future__ import annotations

from dataclasses import dataclass

from marginlab.core.norms import Norm
from marginlab.estimators.base import NORM_ERROR, NORMS

__all__ = ["PRESETS", "AttackPresets", "best_attacks", "bracket_attacks", "prepass_bound", "presets"]


@dataclass(frozen=True)
class AttackPresets:
    """The default attacks of one norm (estimator names of :data:`marginlab.estimators.ESTIMATORS`)."""

    best: tuple[str, ...]  # what `best` combines when no attack is named
    bracket: tuple[str, ...]  # the upper end of a bracket
    prepass_bound: str  # the robustness bound pre-pass ("auto")


PRESETS: dict[Norm, AttackPresets] = {
    Norm.L2: AttackPresets(best=("ddn", "fmn"), bracket=("deepfool", "ddn"), prepass_bound="ddn"),
    Norm.Linf: AttackPresets(best=("fmn", "deepfool"), bracket=("deepfool", "fmn"), prepass_bound="fmn"),
}


def presets(norm: Norm | float | str) -> AttackPresets:
    """The default attacks of ``norm`` (any spelling :meth:`Norm.parse` accepts: ``Norm.L2``, ``2.0``,
    ``"Linf"``...); a norm the estimators do not support is a one-line ConfigError."""
    return PRESETS[Norm.parse(norm, NORMS, error=NORM_ERROR)]


def best_attacks(norm: Norm | float | str) -> tuple[str, ...]:
    """The attacks ``best`` combines when none are named: DDN and FMN for L2, FMN and DeepFool for L∞."""
    return presets(norm).best


def bracket_attacks(norm: Norm | float | str) -> tuple[str, ...]:
    """The attacks of a bracket's upper end when none are named: DeepFool + DDN for L2, + FMN for L∞."""
    return presets(norm).bracket


def prepass_bound(norm: Norm | float | str) -> str:
    """The robustness bound pre-pass's estimator for ``bound="auto"``: DDN for L2, FMN for L∞."""
    return presets(norm).prepass_bound
