"""Certified lower bounds of a linear specification of a network's logits over an input set: linear bound
propagation (CROWN / DeepPoly-style) with interval bounds, on the CPU in float64.

For the operations ``f = op_n ∘ ... ∘ op_1`` of a network (:func:`marginlab.bounds.network.network_ops`),
an input set ``X`` (:class:`marginlab.bounds.domain.InputSet`) and a specification ``C [B,S,K]`` on the
logits, :func:`lower_bounds` returns ``L [B,S]`` with

    L <= min_{x in X} C f(x).

How (Zhang et al. 2018, "CROWN"; Singh et al. 2019, "DeepPoly"): walking backward from the output, the
rows ``A`` of a linear function of the current layer (``A = C`` at the logits) are pulled through each
operation by its relaxation (:mod:`marginlab.bounds.ops`), ``A op(z) >= A' z + d``, collecting the offsets
``d``, until ``A`` is a function of the input, minimised over ``X`` in closed form
(:meth:`InputSet.concretize`): ``L = min_{x in X} A x + sum d``.

The relaxations of ReLU and max-pooling need bounds ``l <= z <= u`` on their inputs: :func:`layer_bounds`
computes them layer by layer, by interval arithmetic (IBP) always and by the same backward pass
(identity specification, one row per neuron and sign) where (neurons of the layer) x (widest layer below
it) <= ``crown_budget``, keeping the tighter of the two. Convolutional layers of image nets have tens of
thousands of neurons, so by default their bounds come from IBP (the backward pass per neuron would cost
minutes per point on a CPU); the first block of affine layers is bounded exactly for L-inf sets (and for
the L2 ball while at most one of its maps is not diagonal). IBP bounds grow quickly with depth: on a CNN
the result can be no better than the global Lipschitz bound (docs/bounds.md has measurements).

auto_LiRPA, the reference implementation, pins torch<1.13 and cannot be installed beside this
project's torch, hence this hand-written version of the parts needed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from marginlab.bounds.domain import InputSet
from marginlab.bounds.ops import Affine, Op, Shape

# Floats of one backward pass held at once (A [B, S, n]); chunks of neurons are sized to fit.
_BUDGET = 1 << 24
# Backward-propagated bounds for a layer of n neurons cost about n times the widest layer below it:
# affordable for MLPs (784-1024-1024: 2^20), not for the conv layers of an image CNN (2^28 and more).
CROWN_BUDGET = 1 << 22

Bounds = dict[int, tuple[Tensor, Tensor]]  # op index -> (l, u) [B,*ops[i].in_shape] at its input


def _backward(ops: Sequence[Op], bounds: Bounds, a: Tensor, inset: InputSet) -> Tensor:
    """Lower bound ``[B,S]`` of ``a [B,S,*out of ops[-1]] . ops(x)`` over ``inset``."""
    d = torch.zeros(a.shape[:2], dtype=torch.float64, device=a.device)
    for i in range(len(ops) - 1, -1, -1):
        a, di = ops[i].backward(a, bounds.get(i))
        d = d + di
    return inset.concretize(a.flatten(2)) + d


def _crown_neuron_bounds(ops: Sequence[Op], bounds: Bounds, inset: InputSet) -> tuple[Tensor, Tensor]:
    """Bounds ``[B,*out]`` of every output neuron of ``ops`` (identity specification, in chunks)."""
    shape = ops[-1].out_shape
    n, b = math.prod(shape), len(inset.x0)
    widest = max(math.prod(op.in_shape) for op in ops)
    chunk = max(1, min(n, _BUDGET // (2 * b * widest)))
    eye = torch.eye(n, dtype=torch.float64, device=inset.x0.device)
    lows, highs = [], []
    for start in range(0, n, chunk):
        rows = eye[start : start + chunk]
        spec = torch.cat([rows, -rows]).expand(b, -1, -1).reshape(b, -1, *shape)
        low = _backward(ops, bounds, spec, inset)
        lows.append(low[:, : len(rows)])
        highs.append(-low[:, len(rows) :])
    return torch.cat(lows, 1).reshape(b, *shape), torch.cat(highs, 1).reshape(b, *shape)


def _first_block_bounds(ops: Sequence[Op], in_shape: Shape, inset: InputSet) -> tuple[Tensor, Tensor]:
    """Bounds at the output of the affine ops before the first nonlinearity, exact for L-inf sets and for
    the L2 ball when at most one op is not diagonal (else interval arithmetic, which stays sound)."""
    b = len(inset.x0)
    lo, hi = (t.reshape(b, *in_shape) for t in inset.interval())
    for op in ops:
        lo, hi = op.ibp(lo, hi)
    general = sum(not op.diagonal for op in ops if isinstance(op, Affine))
    if inset.p == 2.0 and general <= 1:
        center = inset.x0.reshape(b, *in_shape)
        sq = torch.ones_like(center)
        for op in ops:
            assert isinstance(op, Affine)
            center, sq = op.forward(center), op.sq_lin(sq)
        radius = sq.sqrt() * inset.eps.reshape(b, *[1] * (sq.dim() - 1))
        radius = torch.where(sq > 0, radius, torch.zeros_like(radius))
        lo, hi = torch.maximum(lo, center - radius), torch.minimum(hi, center + radius)
    return lo, hi


def layer_bounds(ops: Sequence[Op], inset: InputSet, *, crown_budget: int = CROWN_BUDGET) -> Bounds:
    """``{i: (l, u)}``, each ``[B,*ops[i].in_shape]``: bounds at the input of every nonlinear ``ops[i]``
    over ``inset`` (``x0 [B,D]``), by IBP and, within ``crown_budget``, the backward pass per neuron."""
    bounds: Bounds = {}
    for i, op in enumerate(ops):
        if isinstance(op, Affine):
            continue
        if not bounds:
            lo, hi = _first_block_bounds(ops[:i], ops[0].in_shape, inset)
        else:
            j = max(bounds)  # the previous nonlinearity: interval arithmetic from its bounds
            lo, hi = ops[j].ibp(*bounds[j])
            for k in range(j + 1, i):
                lo, hi = ops[k].ibp(lo, hi)
            widest = max(math.prod(o.in_shape) for o in ops[:i])
            if math.prod(op.in_shape) * widest <= crown_budget:  # the cost of one backward pass per neuron
                cl, ch = _crown_neuron_bounds(ops[:i], bounds, inset)
                lo, hi = torch.maximum(lo, cl), torch.minimum(hi, ch)
        bounds[i] = (lo, hi)
    return bounds


def lower_bounds(
    ops: Sequence[Op],
    x0: Tensor,
    eps: Tensor,
    spec: Tensor,
    *,
    p: float,
    box: bool,
    crown_budget: int = CROWN_BUDGET,
) -> Tensor:
    """Certified ``L [B,S] <= min_{x in X} spec f(x)`` for ``x0 [B,*in]``, ``eps [B]``, ``spec [B,S,K]``,
    ``X`` the Lp ball of radius ``eps`` around ``x0`` (intersected with [0,1]^d when ``box``)."""
    inset = InputSet(x0.double().flatten(1), eps.double(), p, box)
    bounds = layer_bounds(ops, inset, crown_budget=crown_budget)
    return _backward(ops, bounds, spec.double(), inset)


def margin_spec(y: Tensor, num_classes: int, sign: Tensor) -> Tensor:
    """``[B,K-1,K]``: rows ``sign * (e_y - e_k)`` for every ``k != y`` (``y [B]``, ``sign [B]`` of +-1):
    ``spec f(x)`` holds the logit gaps ``f_y - f_k`` (times ``sign``)."""
    eye = torch.eye(num_classes, dtype=torch.float64, device=y.device)
    rows = eye[y][:, None, :] - eye[None, :, :]  # [B,K,K]
    keep = ~torch.eye(num_classes, dtype=torch.bool, device=y.device)[y]  # drop k = y
    return rows[keep].reshape(len(y), num_classes - 1, num_classes) * sign[:, None, None].double()
