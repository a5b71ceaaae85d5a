"""Exact margins and minimal adversarial examples of linear classifiers (closed forms).

A multiclass linear classifier ``f_k(x) = w_k . x + b_k`` predicts ``argmax_k f_k(x)``. The decision
region of class ``y`` is the polyhedron ``F_y = {x : g_k(x) >= 0 for all k != y}`` with
``g_k(x) = (w_y - w_k) . x + b_y - b_k``, and the Lp distance from ``x`` to the hyperplane ``g_k = 0``
is ``|g_k(x)| / ||w_y - w_k||_q`` with ``q`` the dual exponent of ``p`` (1/p + 1/q = 1, Hoelder).

The margin is the closed form ``m(x, y) = min_{k != y} g_k(x) / ||w_y - w_k||_q``. What it means:

* ``m > 0`` (x classified as y): exactly the Lp distance from x to the boundary of F_y, i.e. the norm of
  the smallest perturbation that changes the prediction. Exact because x lies inside every halfspace
  ``g_k >= 0`` and the complement of F_y is the union of the complements.
* ``m < 0`` (some class k beats y): ``-m`` is the distance to the *farthest* of the pairwise hyperplanes
  ``g_k = 0`` over the classes k that beat y (the min picks the most negative ratio). Since F_y lies inside
  each of those halfspaces, ``-m <= dist_p(x, F_y)``: the closed form is an upper bound on the true signed
  margin ``-dist_p(x, F_y)``, equal to it for two classes (and whenever the projection onto that farthest
  hyperplane lands in F_y), possibly smaller in magnitude for three or more classes.

Degenerate pairs ``w_y == w_k``: ``g_k`` is the constant ``b_y - b_k``; the pair contributes ``+inf``
(class k can never beat y), ``-inf`` (y can never beat k) or ``0`` (exact tie everywhere).
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError, DataError
from marginlab.core.norms import Norm


def _as_params(weight: Tensor | nn.Linear, bias: Tensor | float | None) -> tuple[Tensor, Tensor]:
    """Return (weight, bias) tensors, taking both from an ``nn.Linear`` when one is given."""
    if isinstance(weight, nn.Linear):
        if bias is not None:
            raise ConfigError("pass bias=None with an nn.Linear: its own bias is used")
        w = weight.weight.detach()
        b = weight.bias.detach() if weight.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        return w, b
    w = torch.as_tensor(weight).detach()
    if bias is None:
        return w, torch.zeros(w.shape[:1] if w.dim() == 2 else (), dtype=w.dtype)
    return w, torch.as_tensor(bias, dtype=w.dtype).detach()


def _prepare(weight: Tensor | nn.Linear, bias: Tensor | float | None, x: Tensor) -> tuple[Tensor, ...]:
    """Weights, bias and ``x`` flattened to [N, D], all in one floating dtype on ``x``'s device.

    The dtype is the promotion of the inputs' dtypes, at least float32 (bytes or halves lose too much).
    """
    w, b = _as_params(weight, bias)
    x = torch.as_tensor(x).detach()
    dtype = torch.float32
    for t in (x, w, b):
        dtype = torch.promote_types(dtype, t.dtype)
    xf = x.reshape(len(x), -1).to(dtype)
    if xf.shape[1] != w.shape[-1]:
        raise ConfigError(
            f"inputs have {xf.shape[1]} features per point but the weights expect {w.shape[-1]}"
        )
    return w.to(xf.device, dtype), b.to(xf.device, dtype), xf


def _binary_ratio(num: Tensor, w: Tensor, q: float) -> Tensor:
    """``num / ||w||_q`` [N]; for w = 0 the zero-norm convention: sign(num) * inf, and 0 where num = 0."""
    norm = torch.linalg.vector_norm(w, ord=q)
    if bool(norm > 0):
        return num / norm
    return torch.where(num == 0, torch.zeros_like(num), num.sign() * math.inf)


def _check_binary(w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Binary weight [D] (or [1, D]) and scalar bias."""
    if w.numel() != w.shape[-1] or b.numel() != 1:
        raise ConfigError(
            f"binary weight must be [D] with a scalar bias, got {tuple(w.shape)}, {tuple(b.shape)}"
        )
    return w.reshape(-1), b.reshape(())


def _pm1(y: Tensor, n: int) -> Tensor:
    y = torch.as_tensor(y).detach().reshape(-1)
    if len(y) != n:
        raise ConfigError(f"got {len(y)} labels for {n} points")
    if not bool(((y == 1) | (y == -1)).all()):
        raise DataError("binary labels must be -1/+1; load the data with labels='pm1'")
    return y


def binary_margins(
    w: Tensor | nn.Linear,
    b: Tensor | float | None,
    x: Tensor,
    y: Tensor,
    p: Norm | float | str = 2,
    signed: bool = True,
) -> Tensor:
    """Margins ``y (w.x + b) / ||w||_q`` [N] of the binary classifier sign(w.x + b) (exact, both signs).

    ``w`` [D] (or an ``nn.Linear`` with one output and ``b=None``), ``b`` scalar, ``x`` [N, D] or
    [N, C, H, W], ``y`` [N] in {-1, +1}. ``signed=False`` gives the distance ``|w.x + b| / ||w||_q``.
    For two classes the signed value is the exact signed Lp distance to the decision boundary.
    """
    q = Norm.parse(p).q
    w, b, xf = _prepare(w, b, x)
    w, b = _check_binary(w, b)
    y = _pm1(y, len(xf)).to(xf)
    f = xf @ w + b
    return _binary_ratio(y * f if signed else f.abs(), w, q)


def _check_multiclass(w: Tensor, b: Tensor, y: Tensor, n: int) -> Tensor:
    if w.dim() != 2 or w.shape[0] < 2:
        raise ConfigError(f"multiclass weight must be [K>=2, D], got {tuple(w.shape)}; use binary_margins")
    if b.shape != (w.shape[0],):
        raise ConfigError(f"bias must be [{w.shape[0]}], got {tuple(b.shape)}")
    y = torch.as_tensor(y).reshape(-1).long().to(w.device)
    if len(y) != n:
        raise ConfigError(f"got {len(y)} labels for {n} points")
    lo, hi = torch.aminmax(y) if n else (0, 0)
    if int(lo) < 0 or int(hi) >= w.shape[0]:
        raise DataError(f"labels must be class indices in [0, {w.shape[0] - 1}]")
    return y


def _pair_tables(w: Tensor, b: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """Per class pair (y, k): ``inv`` [K, K] = 1 / ||w_y - w_k||_q and ``offset`` [K, K].

    Ratios are then ``g * inv[y] + offset[y]`` with ``offset`` = +inf on the diagonal (a class is not its
    own competitor) and, for a degenerate pair (w_y == w_k, so g = b_y - b_k whatever x), the constant
    ratio +inf, -inf or 0 (with inv = 0 there). NaN inputs still propagate.
    """
    norms = torch.linalg.vector_norm(w[:, None, :] - w[None, :, :], ord=q, dim=-1)
    eye = torch.eye(len(w), dtype=torch.bool, device=w.device)
    degenerate = (norms == 0) & ~eye
    inv = torch.where(degenerate | eye, torch.zeros_like(norms), 1.0 / norms)
    const = b[:, None] - b[None, :]
    const = torch.where(const == 0, torch.zeros_like(const), const.sign() * math.inf)
    offset = torch.where(degenerate, const, torch.zeros_like(norms)).masked_fill(eye, math.inf)
    return inv, offset


def _pairwise(w: Tensor, b: Tensor, x: Tensor, y: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """Pairwise values ``g`` [N, K] and ratios ``g / ||w_y - w_k||_q`` [N, K] (``+inf`` at k = y).

    One matmul of logits, taken after subtracting the mean class (which leaves every ``w_y - w_k``
    unchanged): a component shared by all classes cancels in the margins but not in the logits, and would
    otherwise make the rounding of ``f_y - f_k`` scale with the logits instead of with the differences.
    Everything else is a handful of [N, K] operations, since K x K tables hold the per-pair constants.
    """
    logits = torch.addmm(b - b.mean(), x, (w - w.mean(dim=0)).T)  # [N, K]
    g = logits.gather(1, y[:, None]) - logits
    inv, offset = _pair_tables(w, b, q)
    return g, torch.addcmul(offset[y], g, inv[y])


def linear_margins(
    weight: Tensor | nn.Linear,
    bias: Tensor | None,
    x: Tensor,
    y: Tensor,
    p: Norm | float | str = 2,
    signed: bool = True,
) -> Tensor:
    """Closed-form margins [N] of the linear classifier ``argmax_k (weight @ x + bias)_k``.

    ``weight`` [K, D] (K >= 2) or an ``nn.Linear`` (then ``bias=None``), ``bias`` [K] or None (zeros),
    ``x`` [N, D] or [N, C, H, W] (flattened), ``y`` [N] int64 class indices, ``p`` the attack norm
    (1, 2, inf). Returns ``min_{k != y} ((w_y - w_k).x + b_y - b_k) / ||w_y - w_k||_q``: the exact
    Lp distance to the boundary of the region of class y when positive, and for a misclassified point
    minus the distance to the farthest pairwise boundary with a class that beats y, which is at most the
    distance to the region of y (exact for K = 2; see the module docstring). ``signed=False`` returns
    the absolute value. Computed in float32 or the inputs' wider dtype; returns that dtype.
    """
    q = Norm.parse(p).q
    w, b, xf = _prepare(weight, bias, x)
    y = _check_multiclass(w, b, y, len(xf))
    _, ratio = _pairwise(w, b, xf, y, q)
    margins = ratio.min(dim=1).values
    return margins if signed else margins.abs()


class MinimalAdversarial(NamedTuple):
    """Result of :func:`minimal_adversarial`.

    ``x``: adversarial inputs, same shape as the input; ``norm`` [N]: ``||x_adv - x||_p`` (the margin
    times ``1 + overshoot``; 0 for points already misclassified; ``inf`` where no perturbation can change
    the prediction); ``target`` [N]: the class whose boundary was crossed, -1 where x is unchanged (for
    binary problems the new label -1/+1, and 0 where x is unchanged).
    """

    x: Tensor
    norm: Tensor
    target: Tensor


def _step(a: Tensor, g: Tensor, p: float) -> Tensor:
    """Smallest Lp perturbation [N, D] that moves ``a.x + g`` to 0, for rows ``a`` [N, D], ``g`` [N]."""
    if p == 2.0:
        return -(g / a.square().sum(1))[:, None] * a
    if p == math.inf:
        return -(g / a.abs().sum(1))[:, None] * a.sign()
    # p = 1: move only the coordinate with the largest |a_j|, the cheapest way in L1.
    j = a.abs().argmax(dim=1, keepdim=True)
    step = torch.zeros_like(a)
    return step.scatter_(1, j, -(g[:, None] / a.gather(1, j)))


def minimal_adversarial(
    weight: Tensor | nn.Linear,
    bias: Tensor | float | None,
    x: Tensor,
    y: Tensor,
    p: Norm | float | str = 2,
    overshoot: float = 1e-4,
) -> MinimalAdversarial:
    """Closed-form minimal Lp perturbation (p = 1, 2, inf) that changes a linear classifier's prediction.

    Binary: ``weight`` [D], scalar ``bias``, ``y`` in {-1, +1}. Multiclass: ``weight`` [K, D] (or an
    ``nn.Linear``), ``bias`` [K], ``y`` class indices. ``x`` [N, D] or [N, C, H, W]. Each correctly
    classified point moves toward its nearest pairwise boundary by ``(1 + overshoot)`` times its margin,
    which lands just across it (the Hoelder bound shows the other pairwise constraints still hold on the
    boundary, so it is the nearest point of the boundary of the region). Points with margin <= 0 are
    already adversarial and are returned unchanged. The result is not clamped to the image box [0, 1]:
    clamping would give a valid image but no longer the minimal perturbation (nor, in general, one that
    still crosses). Rounding: margins below ~1e-6 of the (class-centred) logits may need a larger overshoot.
    """
    if overshoot < 0:
        raise ConfigError(f"overshoot must be >= 0, got {overshoot}")
    lp = Norm.parse(p)
    w, b, xf = _prepare(weight, bias, x)
    if w.dim() == 1 or w.shape[0] == 1:  # binary: g = y (w.x + b), the step direction is y w
        w, b = _check_binary(w, b)
        yy = _pm1(y, len(xf)).to(xf)
        a = yy[:, None] * w
        g = yy * (xf @ w + b)
        margin = _binary_ratio(g, w, lp.q)
        target = -yy.long()  # the new sign
    else:
        yl = _check_multiclass(w, b, y, len(xf))
        g_all, ratio = _pairwise(w, b, xf, yl, lp.q)
        margin, target = ratio.min(dim=1)
        a = w[yl] - w[target]
        g = g_all.gather(1, target[:, None]).squeeze(1)
    move = torch.isfinite(margin) & (margin > 0)
    delta = torch.zeros_like(xf)
    if bool(move.any()):
        delta[move] = (1.0 + overshoot) * _step(a[move], g[move], lp.p)
    # margin <= 0: already adversarial (0); +inf: no perturbation changes the prediction; NaN stays NaN
    norm = torch.where(move, (1.0 + overshoot) * margin, torch.where(margin <= 0, 0.0, margin))
    target = torch.where(move, target, torch.full_like(target, 0 if w.dim() == 1 else -1))
    x_adv = (xf + delta).reshape(torch.as_tensor(x).shape)
    return MinimalAdversarial(x_adv, norm, target)
