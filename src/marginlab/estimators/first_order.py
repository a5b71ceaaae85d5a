"""First-order (linearised) margin: ``min_{k!=y} (f_y - f_k)(x) / ||grad_x (f_y - f_k)(x)||_q``.

Exact for linear models (the R^d margin); for deep nets an estimate of the distance to the boundary
along the local linearisation (neither a lower nor an upper bound). Its domain is R^d (``rd``): asked
for the box, it says so in one line and its result stays marked ``rd``.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from marginlab.core.norms import Norm
from marginlab.estimators.base import Estimator, MarginKind, register


def gap_gradient_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, q: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit gaps and the q-norms of their input gradients.

    Returns ``gaps [n,K]`` with ``gaps[i,k] = (f_{y_i} - f_k)(x_i)`` and ``norms [n,K]`` with
    ``norms[i,k] = ||grad_x (f_{y_i} - f_k)(x_i)||_q`` (zero in column ``y_i``). One backward pass per
    class over the whole batch: the model must treat the points of a batch independently (true in
    eval mode for every layer used here; batch-norm in train mode would break it).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        gaps = logits.gather(1, y[:, None]) - logits
        k_classes = logits.shape[1]
        norms = []
        for k in range(k_classes):
            (g,) = torch.autograd.grad(gaps[:, k].sum(), x, retain_graph=k < k_classes - 1)
            norms.append(torch.linalg.vector_norm(g.flatten(1), ord=q, dim=1))
    return gaps.detach(), torch.stack(norms, dim=1)


def min_ratio(gaps: torch.Tensor, denom: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``min_{k != y} gaps[:, k] / denom[:, k]`` -> ``[n]``; a zero denominator counts as +-inf.

    For a correctly classified point every gap is positive and the minimum is the nearest
    boundary; for a misclassified one the most negative ratio is taken (the class that beats ``y``
    by the most, relative to its slope).
    """
    ratio = gaps / denom
    ratio = torch.where(denom > 0, ratio, torch.sign(gaps) * math.inf)
    ratio = torch.where(ratio.isnan(), math.inf, ratio)  # 0/0: a class tied everywhere does not bind
    ratio.scatter_(1, y[:, None], math.inf)
    return ratio.min(dim=1).values


@register("first-order")
@dataclass(kw_only=True)
class FirstOrder(Estimator):
    """``min_{k!=y} (f_y - f_k)(x) / ||grad (f_y - f_k)(x)||_q``: vectorised over points and classes."""

    kind = MarginKind.ESTIMATE
    needs = frozenset({"grad"})
    domains = frozenset({"rd"})  # the linearisation ignores the box: an estimate of the R^d margin
    domain: str = "rd"

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        gaps, norms = gap_gradient_norms(model, x, y, Norm.parse(p).q)
        return min_ratio(gaps, norms, y)
