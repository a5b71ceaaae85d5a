"""Certified lower bounds of a linear specification of a network's logits over an input set: linear bound
propagation (CROWN, Zhang et al. 2018; DeepPoly, Singh et al. 2019) on a :class:`Graph`, CPU, float64.

For a network (a :class:`~marginlab.bounds.graph.Graph`, or a list of ops: a chain), an input set ``X``
(:class:`marginlab.bounds.domain.InputSet`) and a specification ``C [B,S,K]`` on the logits,
:func:`lower_bounds` returns ``L [B,S]`` with

    L <= min_{x in X} C f(x).

How: rows ``A = C`` at the logits are pulled back to the input (:mod:`marginlab.bounds.backsub`) through
the relaxations of :mod:`marginlab.bounds.ops`, ``A op(z) >= A' z + d``, and ``L = min_X A x + sum d``.

The relaxations of ReLU and max-pooling need bounds ``l <= z <= u`` on their inputs (*intermediate*
bounds). :func:`layer_bounds` computes them node by node in topological order: interval arithmetic (IBP)
from the bounds below (exact for the first affine block of an L-inf set or an L2 ball in R^d; for an L2
ball in the box, at least the ball's), intersected with
earlier bounds that hold on a larger set (``prior``), and then, for the neurons whose relaxation the
bounds still leave inexact, the same back-substitution with one row per neuron and sign (CROWN itself):

- a ReLU's unstable inputs (``l < 0 < u``); when the ReLU feeds a max-pooling, also its possibly active
  inputs in pooling windows whose maximum is not yet decided; a max-pooling's inputs in such windows;
- rows of a convolutional node live on their receptive-field windows (:mod:`marginlab.bounds.windows`),
  those of a fully connected node on whole maps;
- rows of all points run as one batch, in chunks of at most ``crown_budget`` floats (a row's largest
  coefficient block times the kernel area of the convolutions it passes); a node whose single row does
  not fit keeps its interval bounds (with a warning).

Everything runs in float64 on the CPU, so the bounds are sound up to float64 rounding. auto_LiRPA, the
reference implementation (whose patch mode the windows follow), pins torch<1.13 and cannot be installed
beside this project's torch, hence this hand-written version.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from marginlab.bounds.backsub import Bounds, Relaxations, input_rows, lower, relaxations
from marginlab.bounds.domain import InputSet
from marginlab.bounds.graph import INPUT, Add, Graph, as_graph
from marginlab.bounds.neurons import exits, first_rows, needs_rows, row_floats, unit_rows
from marginlab.bounds.ops import Affine, MaxPool, Op, ReLU

__all__ = ["CROWN_BUDGET", "Bounds", "layer_bounds", "lower_bounds", "margin_spec", "spec_rows"]

log = logging.getLogger(__name__)

# Floats of one chunk of back-substitution rows (float64: 64 MiB; the working set is a few times that).
CROWN_BUDGET = 1 << 23
INTERMEDIATE = ("crown", "ibp")


def _ibp(graph: Graph, k: int, boxes: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Interval image ``[B,*out]`` of node ``k`` from the intervals of its inputs."""
    node = graph.nodes[k]
    if isinstance(node.op, Add):
        (la, ha), (lb, hb) = (boxes[j] for j in node.inputs)
        return la + lb, ha + hb
    return node.op.ibp(*boxes[node.inputs[0]])


def _first_block(graph: Graph, inset: InputSet) -> tuple[dict[int, tuple[Tensor, Tensor]], set[int]]:
    """The affine nodes that form a chain from the input with at most one map that is not diagonal (one
    dense or conv layer and scalings): for an L2 set their exact ball bounds ``x0' ± eps ||row||_2``;
    and the nodes whose bounds are exact already (interval bounds of a box, L-inf; the ball bound, L2
    in R^d), which need no rows."""
    chain: list[int] = []
    general = 0
    for k, node in enumerate(graph.nodes):
        if node.inputs != (k - 1,) or not isinstance(node.op, Affine):
            break
        general += not node.op.diagonal
        if general > 1:
            break
        chain.append(k)
    ball: dict[int, tuple[Tensor, Tensor]] = {}
    if inset.p == 2.0:
        center = inset.x0.reshape(len(inset.x0), *graph.in_shape)
        sq = torch.ones_like(center)
        for k in chain:
            op = graph.nodes[k].op
            assert isinstance(op, Affine)
            center, sq = op.forward(center), op.sq_lin(sq)
            eps = inset.eps.reshape(-1, *[1] * (sq.dim() - 1))
            radius = torch.where(sq > 0, sq.sqrt() * eps, torch.zeros_like(sq))
            ball[k] = (center - radius, center + radius)
    exact = set(chain) if inset.p == math.inf or (inset.p == 2.0 and not inset.box) else set()
    return ball, exact


@dataclass
class _Context:
    """What :func:`_tighten` needs besides the node: the network, the bounds so far (their
    relaxations; the intervals ``boxes [B,*shape]`` of every node's output), the input set, the budget."""

    graph: Graph
    users: list[list[int]]
    relax: Relaxations
    boxes: dict[int, tuple[Tensor, Tensor]]
    inset: InputSet
    budget: int
    windows: bool
    early_exit: bool


def _tighten(ctx: _Context, k: int, box: tuple[Tensor, Tensor], need: Tensor) -> tuple[Tensor, Tensor]:
    """``box [B,*shape]`` of node ``k``'s output with the neurons ``need`` bounded by back-substitution
    (two rows each: ``+e_j`` for the lower bound, ``-e_j`` for the upper), in chunks under the budget."""
    lo, hi = box[0].clone(), box[1].clone()
    idx = need.nonzero()
    if len(idx) == 0:
        return lo, hi
    graph = ctx.graph
    shape = graph.nodes[k].op.out_shape
    windowed = ctx.windows and len(shape) == 3
    per_row = row_floats(graph, k, windowed)
    if per_row > ctx.budget:
        log.warning(
            "bound propagation: one row of node %d (%s) needs %d floats > crown_budget %d; interval bounds",
            k, graph.nodes[k].name, per_row, ctx.budget,
        )  # fmt: skip
        return lo, hi
    exit_active, exit_inactive = exits(graph, ctx.users, k) if ctx.early_exit else (False, False)
    for part in idx.split(max(1, ctx.budget // per_row // 2)):
        n = len(part)

        def settle(value: Tensor, ids: Tensor, n: int = n) -> Tensor:
            """The rows of neurons proven stable, where that makes their relaxation exact, stop."""
            now = torch.full((2 * n,), -math.inf, dtype=value.dtype)
            now[ids] = value  # the two rows of a neuron stop together, so both are alive here
            stable = ((now[:n] >= 0) & exit_active) | ((now[n:] >= 0) & exit_inactive)
            return stable[ids % n]

        start, rows, offset = first_rows(graph, k, unit_rows(shape, part, windowed))
        check = settle if exit_active or exit_inactive else None
        low = lower(graph, start, rows, ctx.relax, ctx.inset, boxes=ctx.boxes, settle=check, offset=offset)
        at = tuple(part.T)
        lo[at] = torch.maximum(lo[at], low[:n])
        hi[at] = torch.minimum(hi[at], -low[n:])
    return lo, hi


def layer_bounds(
    network: Graph | Sequence[Op],
    inset: InputSet,
    *,
    crown_budget: int = CROWN_BUDGET,
    prior: Bounds | None = None,
    intermediate: str = "crown",
    windows: bool = True,
    every_neuron: bool = False,
) -> Bounds:
    """``{k: (l, u)}``, each ``[B,*in_shape]``: bounds at the input of every nonlinear node ``k`` (for a
    list of ops: op index) over ``inset`` (``x0 [B,D]``).

    ``prior``: bounds of the same form known to hold on ``inset`` (e.g. computed over a larger set):
    intersected, and neurons they decide get no rows. ``intermediate``: ``"crown"`` (back-substitution
    for the undecided neurons) or ``"ibp"`` (interval bounds only: fast, loose). ``windows``: rows of
    convolutional nodes on their receptive fields (``False``: on whole maps, for tests);
    ``every_neuron``: full rows for every neuron, decided or not, none stopping early (for tests).
    """
    if intermediate not in INTERMEDIATE:
        raise ValueError(f"intermediate must be one of {INTERMEDIATE}, got {intermediate!r}")
    graph = as_graph(network)
    lo_in, hi_in = inset.interval()
    boxes = {INPUT: (lo_in.reshape(-1, *graph.in_shape), hi_in.reshape(-1, *graph.in_shape))}
    ctx = _Context(
        graph, graph.users(), Relaxations({}, {}), boxes, inset, crown_budget, windows, not every_neuron
    )
    ball, exact = _first_block(graph, inset)
    bounds: Bounds = {}
    for k in [INPUT, *range(len(graph))]:
        if k != INPUT:
            lo, hi = _ibp(graph, k, boxes)
            if k in ball:
                lo, hi = torch.maximum(lo, ball[k][0]), torch.minimum(hi, ball[k][1])
            boxes[k] = (lo, hi)
        consumers = [c for c, node in enumerate(graph.nodes) if k in node.inputs]
        consumers = [c for c in consumers if isinstance(graph.nodes[c].op, ReLU | MaxPool)]
        if not consumers:
            continue
        lo, hi = boxes[k]
        for c in consumers:
            if prior is not None and c in prior:
                lo, hi = torch.maximum(lo, prior[c][0]), torch.minimum(hi, prior[c][1])
        crown = intermediate == "crown" and k not in exact
        if k != INPUT and crown and isinstance(graph.nodes[k].op, Affine | Add):
            need = (
                torch.ones_like(lo, dtype=torch.bool)
                if every_neuron
                else needs_rows(graph, ctx.users, k, lo, hi)
            )
            lo, hi = _tighten(ctx, k, (lo, hi), need)
        boxes[k] = (lo, hi)
        for c in consumers:
            bounds[c] = (lo, hi)
            op = graph.nodes[c].op
            if isinstance(op, ReLU):
                ctx.relax.relu[c] = ReLU.relax(lo, hi)
            else:
                assert isinstance(op, MaxPool)
                ctx.relax.pool[c] = op.relax(lo, hi)
    return bounds


def spec_rows(
    network: Graph | Sequence[Op],
    bounds: Bounds,
    spec: Tensor,
    relax: Relaxations | None = None,
    *,
    crown_budget: int = CROWN_BUDGET,
) -> tuple[Tensor, Tensor]:
    """The specification ``spec [B,S,K]`` as linear bounds of the input: ``(A [B,S,D], d [B,S])`` with
    ``spec f(x) >= A x + d`` wherever ``bounds`` hold (``relax``: their relaxations, default CROWN's)."""
    graph = as_graph(network)
    if relax is None:
        relax = relaxations(graph, bounds)
    b, s = spec.shape[:2]
    n = max(1, crown_budget // max(1, s * row_floats(graph, len(graph) - 1, False)))
    parts = [input_rows(graph, spec[i : i + n], relax, first=i) for i in range(0, b, n)]
    return torch.cat([a for a, _ in parts]), torch.cat([d for _, d in parts])


def lower_bounds(
    network: Graph | Sequence[Op],
    x0: Tensor,
    eps: Tensor,
    spec: Tensor,
    *,
    p: float,
    box: bool,
    crown_budget: int = CROWN_BUDGET,
    prior: Bounds | None = None,
    intermediate: str = "crown",
) -> Tensor:
    """Certified ``L [B,S] <= min_{x in X} spec f(x)`` for ``x0 [B,*in]``, ``eps [B]``, ``spec [B,S,K]``,
    ``X`` the Lp ball of radius ``eps`` around ``x0`` (intersected with [0,1]^d when ``box``)."""
    inset = InputSet(x0.double().flatten(1), eps.double(), p, box)
    bounds = layer_bounds(network, inset, crown_budget=crown_budget, prior=prior, intermediate=intermediate)
    a, d = spec_rows(network, bounds, spec.double(), crown_budget=crown_budget)
    return inset.concretize(a) + d


def margin_spec(y: Tensor, num_classes: int, sign: Tensor) -> Tensor:
    """``[B,K-1,K]``: rows ``sign * (e_y - e_k)`` for every ``k != y`` (``y [B]``, ``sign [B]`` of +-1):
    ``spec f(x)`` holds the logit gaps ``f_y - f_k`` (times ``sign``)."""
    eye = torch.eye(num_classes, dtype=torch.float64, device=y.device)
    rows = eye[y][:, None, :] - eye[None, :, :]  # [B,K,K]
    keep = ~torch.eye(num_classes, dtype=torch.bool, device=y.device)[y]  # drop k = y
    return rows[keep].reshape(len(y), num_classes - 1, num_classes) * sign[:, None, None].double()
