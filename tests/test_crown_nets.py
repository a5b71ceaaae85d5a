"""CROWN's intermediate bounds on small float64 networks of every supported layer type, built as
:class:`Graph`s by hand (chains and residual graphs): receptive-field windows give the bounds of whole-map
rows and of an independent dense implementation, lie inside interval bounds, and contain every sampled
activation. The networks and the sampling / PGD helpers are shared with ``test_crown_soundness.py``."""

import math

import pytest
import torch
from torch import Tensor

from marginlab.bounds.backsub import Bounds
from marginlab.bounds.crown import layer_bounds
from marginlab.bounds.domain import InputSet
from marginlab.bounds.graph import INPUT, Add, Graph, Node
from marginlab.bounds.ops import Affine, Conv, Dense, MaxPool, Op, ReLU, Reshape, Scale


def _w(gen: torch.Generator, *shape: int) -> Tensor:
    fan_in = math.prod(shape[1:])
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / fan_in)


def _b(gen: torch.Generator, n: int) -> Tensor:
    return 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)


def conv_chain(seed: int = 0) -> Graph:
    """Input (2, 9, 9): conv stride 2 padding 1, ReLU, dilated conv padding 2, ReLU, max-pool, fc, fc."""
    g = torch.Generator().manual_seed(seed)
    c1 = Conv(_w(g, 3, 2, 3, 3), _b(g, 3), (2, 9, 9), stride=2, padding=1)
    c2 = Conv(_w(g, 4, 3, 3, 3), _b(g, 4), c1.out_shape, padding=2, dilation=2)
    pool = MaxPool(c2.out_shape, (2, 2), (2, 2))
    flat = Reshape(pool.out_shape, (math.prod(pool.out_shape),))
    d1 = Dense(_w(g, 8, flat.out_shape[0]), _b(g, 8))
    ops: list[Op] = [c1, ReLU(c1.out_shape), c2, ReLU(c2.out_shape), pool, flat, d1, ReLU((8,))]
    return Graph.from_ops([*ops, Dense(_w(g, 4, 8), _b(g, 4))], (2, 9, 9))


def scale_avg_chain(seed: int = 1) -> Graph:
    """Input (2, 8, 8): normalisation, conv, batch norm (as Scale), ReLU, average pooling (a depthwise
    conv), grouped conv, ReLU, overlapping max-pool (kernel 3, stride 1), fc."""
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor([0.5, 0.4]).view(2, 1, 1), torch.tensor([0.5, 0.3]).view(2, 1, 1)
    norm = Scale((1 / std).double(), (-mean / std).double(), (2, 8, 8))
    c1 = Conv(_w(g, 4, 2, 3, 3), _b(g, 4), (2, 8, 8), padding=1)
    bn = Scale(1 + 0.3 * torch.rand(4, 1, 1, generator=g).double(), _b(g, 4).view(4, 1, 1), c1.out_shape)
    avg = Conv(torch.full((4, 1, 2, 2), 0.25, dtype=torch.float64), None, c1.out_shape, stride=2, groups=4)
    c2 = Conv(_w(g, 4, 2, 3, 3), _b(g, 4), avg.out_shape, padding=1, groups=2)
    pool = MaxPool(c2.out_shape, (3, 3), (1, 1))
    flat = Reshape(pool.out_shape, (math.prod(pool.out_shape),))
    ops: list[Op] = [norm, c1, bn, ReLU(c1.out_shape), avg, c2, ReLU(c2.out_shape), pool, flat]
    return Graph.from_ops([*ops, Dense(_w(g, 4, flat.out_shape[0]), _b(g, 4))], (2, 8, 8))


def residual_graph(seed: int = 2) -> Graph:
    """Input (2, 8, 8): conv, ReLU, a residual block (conv, ReLU, conv, + skip), ReLU, a downsampling block
    whose two branches (3x3 conv stride 2 after a 3x3 conv; 1x1 conv stride 2) meet in an Add, ReLU, fc."""
    g = torch.Generator().manual_seed(seed)
    s = (3, 8, 8)
    c0 = Conv(_w(g, 3, 2, 3, 3), _b(g, 3), (2, 8, 8), padding=1)
    c1 = Conv(_w(g, 3, 3, 3, 3), _b(g, 3), s, padding=1)
    c2 = Conv(_w(g, 3, 3, 3, 3), _b(g, 3), s, padding=1)
    c3 = Conv(_w(g, 3, 3, 3, 3), _b(g, 3), s, padding=1)
    c4 = Conv(_w(g, 4, 3, 3, 3), _b(g, 4), s, stride=2, padding=1)
    skip = Conv(_w(g, 4, 3, 1, 1), None, s, stride=2)
    t = c4.out_shape
    flat = Reshape(t, (math.prod(t),))
    nodes = [
        Node(c0, (INPUT,)), Node(ReLU(s), (0,)),  # 0, 1
        Node(c1, (1,)), Node(ReLU(s), (2,)), Node(c2, (3,)), Node(Add(s), (4, 1)), Node(ReLU(s), (5,)),  # 2-6
        Node(c3, (6,)), Node(ReLU(s), (7,)), Node(c4, (8,)), Node(skip, (6,)), Node(Add(t), (9, 10)),  # 7-11
        Node(ReLU(t), (11,)), Node(flat, (12,)), Node(Dense(_w(g, 4, flat.out_shape[0]), _b(g, 4)), (13,)),
    ]  # fmt: skip
    return Graph((2, 8, 8), tuple(nodes))


def mlp_chain(seed: int = 3) -> Graph:
    """Input (1, 4, 4): flatten, 16-12-12-4 with ReLUs."""
    g = torch.Generator().manual_seed(seed)
    ops: list[Op] = [Reshape((1, 4, 4), (16,)), Dense(_w(g, 12, 16), _b(g, 12)), ReLU((12,))]
    ops += [Dense(_w(g, 12, 12), _b(g, 12)), ReLU((12,)), Dense(_w(g, 4, 12), _b(g, 4))]
    return Graph.from_ops(ops, (1, 4, 4))


GRAPHS = {"conv": conv_chain, "scale-avg": scale_avg_chain, "residual": residual_graph, "mlp": mlp_chain}


def activations(graph: Graph, x: Tensor) -> list[Tensor]:
    """Every node's output ``[N,*shape]`` on ``x [N,*in]`` (float64, differentiable)."""
    outs: list[Tensor] = []
    for node in graph.nodes:
        args = [x if j == INPUT else outs[j] for j in node.inputs]
        if isinstance(node.op, Add):
            outs.append(args[0] + args[1])
        elif isinstance(node.op, Affine):
            outs.append(node.op.forward(args[0]))
        else:
            outs.append(node.op.ibp(args[0], args[0])[0])
    return outs


def ball_samples(x: Tensor, eps: Tensor, p: float, n: int, gen: torch.Generator, box: bool) -> Tensor:
    """``[n,B,*in]`` points of the balls (many near the sphere and, for L-inf, near the corners)."""
    d = torch.randn(n, *x.shape, generator=gen, dtype=x.dtype)
    view = (n, len(x), *[1] * (x.dim() - 1))
    if p == math.inf:
        d = torch.sign(d) * torch.rand(d.shape, generator=gen, dtype=x.dtype).pow(0.2)
    else:
        d = d / d.flatten(2).norm(dim=2).view(view) * torch.rand(view, generator=gen, dtype=x.dtype).pow(0.2)
    out = x + d * eps.view(1, -1, *[1] * (x.dim() - 1))
    return out.clamp(0, 1) if box else out  # clipping to the box keeps a point of the box in the ball


def pgd_in_ball(
    graph: Graph, x: Tensor, y: Tensor, eps: Tensor, p: float, box: bool, steps: int = 20
) -> Tensor:
    """``[B,*in]``: a PGD attack on the margin ``f_y - max_{k != y} f_k`` inside the balls (and the box)."""
    view = (-1, *[1] * (x.dim() - 1))
    step = eps.view(view) / 6
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = activations(graph, x + delta)[-1]
        own = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], -math.inf).amax(1)
        grad = torch.autograd.grad((own - other).sum(), delta)[0]
        with torch.no_grad():
            if p == math.inf:
                delta = (delta - step * grad.sign()).clamp(-eps.view(view), eps.view(view))
            else:
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
                delta = delta - step * g
                norm = delta.flatten(1).norm(dim=1).view(view)
                delta = delta * (eps.view(view) / norm.clamp_min(1e-30)).clamp(max=1)
            if box:
                delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


CASES = [(p, box) for p in (2.0, math.inf) for box in (False, True)]
CASE_IDS = [f"{'l2' if p == 2 else 'linf'}-{'box' if box else 'rd'}" for p, box in CASES]


def _inset(graph: Graph, p: float, box: bool, n: int = 3, seed: int = 0) -> InputSet:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, math.prod(graph.in_shape), generator=gen, dtype=torch.float64)
    x[:, ::3] = 0.0  # pixels at the edge of the box, where the box domain cuts the ball
    eps = torch.tensor([0.02, 0.06, 0.12][:n], dtype=torch.float64) * (1 if p == math.inf else 4)
    return InputSet(x, eps, p, box)


def _reference_bounds(graph: Graph, inset: InputSet) -> Bounds:
    """CROWN's intermediate bounds of a chain the old way: every neuron of a layer as one dense row per
    point (identity specification) pulled back by ``Op.backward``, intersected with interval bounds."""
    ops = graph.chain()
    b = len(inset.x0)
    bounds: Bounds = {}
    box = tuple(t.reshape(b, *graph.in_shape) for t in inset.interval())
    for i, op in enumerate(ops):
        if isinstance(op, Affine):
            box = op.ibp(*box)
            continue
        n = math.prod(op.in_shape)
        eye = torch.eye(n, dtype=torch.float64)
        a = torch.cat([eye, -eye]).expand(b, -1, -1).reshape(b, 2 * n, *op.in_shape)
        d = torch.zeros(b, 2 * n, dtype=torch.float64)
        for j in range(i - 1, -1, -1):
            a, dj = ops[j].backward(a, bounds.get(j))
            d = d + dj
        low = inset.concretize(a.flatten(2)) + d
        lo = torch.maximum(box[0], low[:, :n].reshape(box[0].shape))
        hi = torch.minimum(box[1], -low[:, n:].reshape(box[1].shape))
        bounds[i] = (lo, hi)
        box = op.ibp(lo, hi)
    return bounds


def _max_gap(a: Bounds, b: Bounds) -> float:
    assert a.keys() == b.keys()
    return max(max((a[k][0] - b[k][0]).abs().max().item(), (a[k][1] - b[k][1]).abs().max().item()) for k in a)


@pytest.mark.parametrize(("p", "box"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", ["conv", "scale-avg", "residual"])
def test_window_rows_give_the_bounds_of_whole_map_rows_and_of_the_dense_reference(
    name: str, p: float, box: bool
) -> None:
    graph = GRAPHS[name]()
    inset = _inset(graph, p, box)
    windows = layer_bounds(graph, inset, windows=True, every_neuron=True)
    dense = layer_bounds(graph, inset, windows=False, every_neuron=True)
    assert _max_gap(windows, dense) < 1e-9
    if graph.is_chain():  # a second, independent implementation of the same CROWN bounds
        assert _max_gap(windows, _reference_bounds(graph, inset)) < 1e-9


@pytest.mark.parametrize(("p", "box"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_crown_bounds_lie_inside_interval_bounds_and_contain_every_sampled_activation(
    name: str, p: float, box: bool
) -> None:
    graph = GRAPHS[name]()
    inset = _inset(graph, p, box)
    crown = layer_bounds(graph, inset)
    ibp = layer_bounds(graph, inset, intermediate="ibp")
    for k, (lo, hi) in crown.items():
        assert (lo >= ibp[k][0] - 1e-12).all() and (hi <= ibp[k][1] + 1e-12).all()
    assert sum(float((ibp[k][1] - ibp[k][0]).sum() - (hi - lo).sum()) for k, (lo, hi) in crown.items()) > 0
    gen = torch.Generator().manual_seed(5)
    x0 = inset.x0.reshape(-1, *graph.in_shape)
    xs = ball_samples(x0, inset.eps, p, 300, gen, box).flatten(0, 1)
    outs = activations(graph, xs)
    for k, (lo, hi) in crown.items():
        z = outs[graph.nodes[k].inputs[0]].reshape(300, *lo.shape)
        assert (z >= lo - 1e-9).all() and (z <= hi + 1e-9).all(), k
