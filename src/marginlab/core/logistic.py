"""Binary logistic regression trained by full-batch gradient descent, with a constant or normalised step.

This is the setting of Theorem 1 (Soudry et al. 2018): on linearly separable data, GD on the logistic
loss with a constant step below 2/L converges in direction to the hard-margin SVM (with a bias, the SVM
whose bias is penalised like a weight). The step-size cap is not needed for that: for the logistic loss
on separable data, GD with *any* constant step converges in direction to the same SVM, the loss now
falling non-monotonically through an early "edge of stability" phase, and a larger step reaches the
max-margin regime sooner (Wu, Bartlett, Telgarsky & Yu, "Large stepsize gradient descent for logistic
loss: non-monotonicity of the loss improves optimization efficiency", COLT 2024). So any ``eta > 0`` is
allowed here; above 2/L the experiment warns that the loss will not fall monotonically.

*Normalised* GD divides the step by the current loss, ``v += eta · (-∇ℓ(v)) / ℓ(v)``: since ∇ℓ ~ ℓ on the
exponential tail, the effective step grows as the data get fit, ‖v‖ grows linearly instead of
logarithmically, and the margin approaches the SVM's much faster (Nacson et al., "Convergence of Gradient
Descent on Separable Data", AISTATS 2019). Everything is float64: late in training the margins are tiny
differences of large logits, and the normalised update is computed in log space so that it stays finite
after every σ(-u_i) has underflowed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothness_constant(x: torch.Tensor) -> float:
    """L of the mean logistic loss of (w, b) on ``x`` [N, D]: ``λ_max(X̃ᵀX̃) / (4N)``, X̃ = [X, 1].

    The Hessian is ``X̃ᵀ diag(σ(1-σ)) X̃ / N`` and σ(1-σ) <= 1/4 (equality at w = 0), so this is the exact
    smoothness constant. λ_max comes from the smaller of the two Gram matrices (same nonzero spectrum).
    """
    n = x.shape[0]
    xt = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], 1).double()
    gram = xt.T @ xt if xt.shape[1] <= n else xt @ xt.T
    return float(torch.linalg.eigvalsh(gram)[-1]) / (4 * n)


def _log_softplus_neg(u: torch.Tensor) -> torch.Tensor:
    """``log(log(1 + exp(-u)))`` elementwise; finite for large ``u`` (there it is ``-u`` in float64)."""
    big = u > 30.0  # log1p(e^-u) = e^-u (1 - e^-u/2 + ...): log of it is -u + O(e^-u)
    safe = torch.where(big, torch.zeros_like(u), u)
    return torch.where(big, -u, torch.log(F.softplus(-safe)))


class LogisticGD:
    """Full-batch GD on ``ℓ(w, b) = mean_i log(1 + exp(-y_i (w·x_i + b)))`` with step
    ``eta = step_fraction · 2/L`` (any ``step_fraction > 0``; below 1 the loss falls monotonically).

    Args:
        x: training inputs [N, D]; y: labels ±1 [N]; w0 [D], b0: the starting point.
        normalized: divide each step by the current loss (normalised GD, see the module doc).

    Pixels that are zero in every training image get a zero gradient forever, so GD runs on the other
    ("active") columns only and those weights keep their initial value: exact, and ~20% faster on MNIST.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        w0: torch.Tensor,
        b0: float,
        *,
        step_fraction: float,
        normalized: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if not step_fraction > 0:
            raise ValueError(f"step_fraction must be > 0, got {step_fraction!r}")
        self.normalized = normalized
        x = x.to(device, torch.float64)
        y = y.to(device, torch.float64)
        self.L = smoothness_constant(x)
        self.eta = step_fraction * 2.0 / self.L
        self.active = (x != 0).any(0)  # [D] bool
        ones = torch.ones(len(y), 1, dtype=torch.float64, device=device)
        self._z = torch.cat([x[:, self.active], ones], 1) * y[:, None]  # [N, A+1]: rows y_i · [x_i, 1]
        self._zt = self._z.T.contiguous()  # row-major copy: the transposed mat-vec runs ~20% faster
        self._w0 = w0.to(device, torch.float64).clone()
        self._v = torch.cat([self._w0[self.active], torch.tensor([b0], dtype=torch.float64, device=device)])
        self._scale = self.eta / len(y)

    def step(self, n: int = 1) -> None:
        """Take ``n`` GD steps: ``v += eta/N · Zᵀ σ(-Z v)`` (minus the gradient of the mean loss); with
        ``normalized``, ``v += eta · Zᵀ σ(-Z v) / Σ_i softplus(-(Z v)_i)`` (the same divided by the loss)."""
        for _ in range(n):
            u = self._z @ self._v  # [N]: y_i (w·x_i + b)
            if self.normalized:
                # σ(-u_i) / Σ_j log(1 + e^{-u_j}), as exp(log σ(-u_i) - logsumexp_j log softplus(-u_j))
                weights = torch.exp(-F.softplus(u) - torch.logsumexp(_log_softplus_neg(u), 0))
                self._v.add_(self._zt @ weights, alpha=self.eta)
            else:
                self._v.add_(self._zt @ torch.sigmoid(-u), alpha=self._scale)

    def loss(self) -> float:
        """The current mean logistic loss (1/N) Σ_i log(1 + exp(-y_i (w·x_i + b)))."""
        return float(torch.nn.functional.softplus(-(self._z @ self._v)).mean())

    def weights(self) -> tuple[torch.Tensor, float]:
        """The current (w [D], b) as a fresh float64 tensor and a float."""
        w = self._w0.clone()
        w[self.active] = self._v[:-1]
        return w, float(self._v[-1])
