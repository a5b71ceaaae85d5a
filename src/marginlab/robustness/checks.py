"""Sanity checks of a robustness evaluation, in the spirit of AutoAttack's ``checks.py``.

Each check returns a one-line message (or ``None``); the evaluator logs it with ``logging.warning`` and
records it in the result's ``warnings``. They catch the usual ways an evaluation overstates robustness:
a model left in train mode (dropout makes it random), probabilities instead of logits (the loss saturates),
vanishing input gradients (gradient masking: gradient attacks stall), attacks that disagree (the weaker one
is not to be trusted), and robust accuracy above what a minimum-norm attack already disproved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.core.predict import predict_logits as predict  # re-exported: the old name

__all__ = [
    "capture_warnings",
    "check_attack_disagreement",
    "check_zero_gradients",
    "predict",
]


def check_zero_gradients(model: nn.Module, x: Tensor, y: Tensor) -> str | None:
    """Count points [N] whose input gradient of the cross-entropy is exactly zero (AutoAttack's check)."""
    if len(x) == 0:
        return None
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
        else:
            grad = None
    zero = len(x) if grad is None else int((grad.flatten(1).abs().sum(1) == 0).sum())
    if zero == 0:
        return None
    return (
        f"{zero} of {len(x)} points have an exactly zero input gradient (gradient masking or saturated "
        "outputs); gradient-based attacks can fail on them and overstate robustness"
    )


def check_attack_disagreement(
    stages: Sequence[str],
    attacks: Sequence[str],
    eps: Sequence[float],
    acc: dict[str, list[float | None]],
    tol: float,
) -> list[str]:
    """Warn where an attack stage broke more than ``tol`` (a share of all points) beyond the earlier attacks.

    ``acc[stage][j]`` is the robust accuracy after ``stage`` at ``eps[j]`` (stages run in order on the
    points still robust), so each drop is what a later attack found that the earlier ones missed.
    """
    out = []
    for i, stage in enumerate(stages):
        earlier = [s for s in stages[:i] if s in attacks]
        if stage not in attacks or not earlier:
            continue
        for j, e in enumerate(eps):
            before, after = acc[stages[i - 1]][j], acc[stage][j]
            if before is None or after is None:  # a stage that did not run at this radius
                continue
            drop = before - after
            if drop > tol + 1e-12:
                out.append(
                    f"{stage} broke {drop:.1%} of points that {'+'.join(earlier)} left robust at eps={e:g} "
                    f"(tolerance {tol:.1%}): {'+'.join(earlier)} alone overstates robustness here"
                )
    return out


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str], prefix: str) -> None:
        super().__init__(level=logging.WARNING)
        self.sink, self.prefix = sink, prefix

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.prefix + record.getMessage())


@contextmanager
def capture_warnings(logger_name: str, sink: list[str], prefix: str = "") -> Iterator[None]:
    """Copy WARNING records of ``logger_name`` (e.g. AutoAttack's own checks) into ``sink``."""
    logger = logging.getLogger(logger_name)
    handler = _ListHandler(sink, prefix)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
