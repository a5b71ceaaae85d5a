"""Robustness evaluation: per ε a band from certified accuracy (CROWN certificates) to the robust accuracy
that PGD and AutoAttack leave (L2 and L∞), the robustness curve from minimal perturbations, and sanity
checks that flag an evaluation which overstates robustness.

    res = robust_accuracy(model, x, y, [0.5, 1.0], norm="L2")     # certify, DDN bound, then AutoAttack
    res.certified, res.worst_case, res.accuracy["autoattack"], res.warnings
    fig = marginlab.plots.robustness.plot_robustness(res.margin_upper(), res)   # the figure
"""

from typing import Any

from marginlab.base.deprecated import moved_attribute
from marginlab.robustness.attacks import ATTACKS, NORMS, RobustnessSettings, normalize_norm
from marginlab.robustness.certify import SoundnessError
from marginlab.robustness.curve import robustness_curve
from marginlab.robustness.evaluate import RobustnessResult, robust_accuracy

__all__ = [
    "ATTACKS",
    "NORMS",
    "RobustnessResult",
    "RobustnessSettings",
    "SoundnessError",
    "normalize_norm",
    "robust_accuracy",
    "robustness_curve",
]


def __getattr__(name: str) -> Any:
    """``plot_robustness`` moved to :mod:`marginlab.plots.robustness` (deprecated alias)."""
    return moved_attribute(__name__, name)
