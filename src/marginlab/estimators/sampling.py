"""``sampling``: the reference code's CLEVER-style margin estimate (no extreme-value fit).

For each class ``k != c``: ``min(R, (f_c - f_k)(x) / max_{x' in B_p(x, R)} ||grad (f_c - f_k)(x')||_q)``,
the maximum taken over ``n_batches x n_samples`` points drawn uniformly in the ``p``-ball; the
margin is the minimum over ``k``. Sampled maxima underestimate the local Lipschitz constant, so
this is an *estimate*, not a certified bound.

Differences from the reference (watml/rob-margin, ``estimateLipschitzBound.py``), all documented:
- ``c`` is the true label ``y``, not the prediction, so misclassified points get a negative value
  (clipped to ``[-R, R]``, since nothing is known beyond the ball); for correctly classified
  points the two coincide.
- The same samples serve all classes (the reference draws fresh ones per class): one forward
  pass and K backward passes instead of K-1 of each; the estimate has the same distribution.
- Several points are sampled at once (``points_per_pass``), each with its own ``n_samples``.
- Samples are not clipped to [0, 1], as in the reference: the estimate is of the R^d margin (domain
  ``rd``; asked for the box, it says so in one line and its result stays marked ``rd``).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from marginlab.base.config import check_count, check_positive
from marginlab.base.seed import check_seed
from marginlab.core.norms import Norm
from marginlab.estimators.base import Estimator, MarginKind, register
from marginlab.estimators.first_order import gap_gradient_norms, min_ratio


def uniform_ball(
    n: int, dim: int, radius: float, p: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``[n, dim]`` points uniform in the ``p``-ball (p = 2 or inf) of ``radius`` around 0."""
    if p == math.inf:
        return radius * (2 * torch.rand(n, dim, generator=generator, device=device) - 1)
    direction = torch.randn(n, dim, generator=generator, device=device)
    direction = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True)
    # Radius ~ R * U^(1/dim) makes the density uniform in volume (in high dimension ~ the sphere).
    scale = torch.rand(n, 1, generator=generator, device=device).pow(1.0 / dim)
    return radius * scale * direction


@register("sampling")
@dataclass(kw_only=True)
class Sampling(Estimator):
    """Reference settings by default: ``radius=5``, ``n_batches=50``, ``n_samples=1024`` per batch.

    Each pass runs ``points_per_pass * n_samples`` inputs through the model and keeps the graph for
    K backward passes: memory grows with both (about 1.5 GB for 4 x 1024 MNIST-CNN inputs).
    Expensive: 50 x 1024 gradients per class and point (see benchmarks/bench_estimators.py).
    """

    kind = MarginKind.ESTIMATE
    needs = frozenset({"grad"})
    domains = frozenset({"rd"})  # samples are not clipped to the box: an estimate of the R^d margin
    domain: str = "rd"

    radius: float = 5.0
    n_batches: int = 50
    n_samples: int = 1024
    points_per_pass: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.param_name("radius"), self.radius)
        for field in ("n_batches", "n_samples", "points_per_pass"):
            check_count(self.param_name(field), getattr(self, field))
        check_seed(self.seed, self.param_name("seed"))

    def _prepare(self, model: nn.Module, x1: torch.Tensor, p: float) -> None:
        # One generator per call: results depend only on the seed, the data and the batching.
        self._generator = torch.Generator(device=x1.device).manual_seed(self.seed)

    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        out = [
            self._chunk(model, x[i : i + self.points_per_pass], y[i : i + self.points_per_pass], p)
            for i in range(0, len(x), self.points_per_pass)
        ]
        return torch.cat(out)

    def _chunk(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        """Estimate for ``x [P,C,H,W]``: ``P * n_samples`` gradient evaluations per batch."""
        q = Norm.parse(p).q
        n_points, dim = len(x), x[0].numel()
        with torch.no_grad():
            logits = model(x)
        gaps = logits.gather(1, y[:, None]) - logits  # [P,K], at the centres
        y_rep = y.repeat_interleave(self.n_samples)
        max_norm = torch.zeros_like(gaps)
        for _ in range(self.n_batches):
            delta = uniform_ball(n_points * self.n_samples, dim, self.radius, p, self._generator, x.device)
            xs = x.repeat_interleave(self.n_samples, dim=0) + delta.view(-1, *x.shape[1:])
            _, norms = gap_gradient_norms(model, xs, y_rep, q)
            max_norm = torch.maximum(max_norm, norms.view(n_points, self.n_samples, -1).amax(dim=1))
        return min_ratio(gaps, max_norm, y).clamp(-self.radius, self.radius)
