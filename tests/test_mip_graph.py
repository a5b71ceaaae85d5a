"""The MILP of a network's graph (``bounds/milp.py``) and its linear regions (``bounds/region.py``): a chain
is the program of its list of layers; a residual graph built by hand solves to the same optimum as the
chain that computes the same function; a linear region's affine map is the network's on it."""

import math

import pytest
import torch

from marginlab.bounds.crown import layer_bounds
from marginlab.bounds.domain import InputSet
from marginlab.bounds.graph import INPUT, Add, Graph, Node
from marginlab.bounds.milp import (
    AddBlock,
    AffineBlock,
    LayerBlock,
    MilpProgram,
    affine_matrix,
    network_blocks,
)
from marginlab.bounds.ops import Affine, Dense, ReLU, Reshape
from marginlab.bounds.region import closest_in_region, linear_region
from marginlab.estimators.mip import require_scip

pytest.importorskip("pyscipopt")


def _dense(gen: torch.Generator, n_out: int, n_in: int) -> Dense:
    return Dense(torch.randn(n_out, n_in, generator=gen), torch.randn(n_out, generator=gen) * 0.3)


def test_a_chain_merges_runs_of_affine_layers_as_a_list_of_layers_does() -> None:
    gen = torch.Generator().manual_seed(0)
    ops = [Reshape((1, 2, 2), (4,)), _dense(gen, 5, 4), ReLU((5,)), _dense(gen, 5, 5), _dense(gen, 3, 5)]
    blocks = network_blocks(ops)
    assert [type(b) for b in blocks] == [AffineBlock, LayerBlock, AffineBlock]
    first, relu, head = blocks
    assert isinstance(first, AffineBlock) and isinstance(head, AffineBlock) and isinstance(relu, LayerBlock)
    assert (first.index, first.last, first.source) == (0, 1, INPUT)
    assert (relu.index, relu.source) == (2, 1) and (head.index, head.last, head.source) == (3, 4, 2)
    affine = [op for op in ops if isinstance(op, Affine)]
    for block, run in ((first, affine[:2]), (head, affine[2:])):
        m, c = affine_matrix(run)
        assert torch.equal(block.matrix, m) and torch.equal(block.bias, c)
    assert [type(b) for b in network_blocks(Graph.from_ops(ops, (1, 2, 2)))] == [type(b) for b in blocks]


def _residual_and_chain(seed: int) -> tuple[Graph, list]:
    """``out = H (z + relu(W2 z + b2)) + bh``, ``z = relu(W1 x + b1)``: a graph with an Add, and the chain
    that computes it through a doubled layer (``relu(z) = z`` since ``z >= 0``)."""
    gen = torch.Generator().manual_seed(seed)
    d1, d2, head = _dense(gen, 6, 2), _dense(gen, 6, 6), _dense(gen, 3, 6)
    nodes = (
        Node(Reshape((1, 1, 2), (2,)), (INPUT,)),
        Node(d1, (0,)),
        Node(ReLU((6,)), (1,)),
        Node(d2, (2,)),
        Node(ReLU((6,)), (3,)),
        Node(Add((6,)), (2, 4)),
        Node(head, (5,)),
    )
    graph = Graph((1, 1, 2), nodes)
    wide = Dense(torch.cat([torch.eye(6), d2.w.float()]), torch.cat([torch.zeros(6), d2.bias.float()]))
    chain = [
        Reshape((1, 1, 2), (2,)),
        d1,
        ReLU((6,)),
        wide,
        ReLU((12,)),
        Dense(torch.cat([head.w, head.w], 1), head.bias),
    ]
    return graph, chain


def _max_gap(network, x0: torch.Tensor, eps: float, k: int, y: int) -> float:
    """``max f_k - f_y`` over the L-inf ball of radius ``eps`` in the box, solved to optimality."""
    inset = InputSet(x0.flatten()[None], torch.tensor([eps], dtype=torch.float64), math.inf, True)
    prog = MilpProgram(require_scip(), network_blocks(network), layer_bounds(network, inset), x0, inset)
    prog.m.setObjective(prog.logit_gap(k, y), "maximize")
    prog.m.setParam("numerics/feastol", 1e-9)
    prog.m.optimize()
    assert prog.m.getStatus() == "optimal"
    return float(prog.m.getObjVal())


@pytest.mark.parametrize("seed", [0, 1])
def test_a_residual_graph_solves_like_its_chain(seed: int) -> None:
    graph, chain = _residual_and_chain(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(64, 1, 1, 2, generator=gen, dtype=torch.float64)
    assert torch.allclose(graph.forward(x), Graph.from_ops(chain, (1, 1, 2)).forward(x), atol=1e-12)
    assert any(isinstance(b, AddBlock) for b in network_blocks(graph))
    for i in range(3):
        y = int(graph.forward(x[i : i + 1])[0].argmax())
        for k in {0, 1, 2} - {y}:
            got, want = _max_gap(graph, x[i], 0.2, k, y), _max_gap(chain, x[i], 0.2, k, y)
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-7)
            # and the optimum is attained: no grid point of the ball does better, one comes close
            t = torch.linspace(-0.2, 0.2, 201, dtype=torch.float64)
            pts = (x[i].flatten() + torch.cartesian_prod(t, t)).clamp(0, 1).reshape(-1, 1, 1, 2)
            logits = graph.forward(pts)
            best = float((logits[:, k] - logits[:, y]).max())
            assert best <= got + 1e-7 and best >= got - 0.05


def test_a_linear_region_is_the_networks_affine_map_on_it() -> None:
    """On random points of the region found at ``x`` (``g x' <= h``), the logits are ``a x' + c``; the
    closest point of the region where class k wins is on the pairwise boundary and no farther than a
    grid point of the region where k wins."""
    graph, _ = _residual_and_chain(2)
    gen = torch.Generator().manual_seed(2)
    x = torch.tensor([0.4, 0.6], dtype=torch.float64)
    region = linear_region(graph, x)
    assert bool((region.g @ x <= region.h + 1e-12).all())
    pts = x + 0.05 * torch.randn(400, 2, generator=gen, dtype=torch.float64)
    inside = pts[((pts @ region.g.T) <= region.h).all(1)]
    assert len(inside) > 10
    assert torch.allclose(
        graph.forward(inside.reshape(-1, 1, 1, 2)), inside @ region.a.T + region.c, atol=1e-12
    )
    y = int(graph.forward(x.reshape(1, 1, 1, 2))[0].argmax())
    for p in (math.inf, 2.0, 1.0):
        for k in {0, 1, 2} - {y}:
            spec = (torch.eye(3, dtype=torch.float64)[k] - torch.eye(3, dtype=torch.float64)[y])[None]
            lo, hi = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
            delta = closest_in_region(region, x, spec, p, lo, hi)
            t = torch.linspace(0, 1, 401, dtype=torch.float64)
            grid = torch.cartesian_prod(t, t)
            ok = ((grid @ region.g.T) <= region.h).all(1) & ((grid @ region.a.T + region.c) @ spec[0] >= 0)
            if not ok.any():
                continue  # k cannot win in this region (the program may still be feasible at its edge)
            assert delta is not None
            gap = float(spec[0] @ (region.a @ (x + delta) + region.c))
            assert abs(gap) <= 1e-6 or float(torch.linalg.vector_norm(delta, ord=p)) == 0
            near = float(torch.linalg.vector_norm(grid[ok] - x, ord=p, dim=1).min())
            assert float(torch.linalg.vector_norm(delta, ord=p)) <= near + 1e-6


def _root_and_optimum(prog: MilpProgram, k: int, y: int, cuts: bool) -> tuple[float, float]:
    """``(dual bound after the root node, optimum)`` of ``max f_k - f_y`` with only the ideal cuts (if
    ``cuts``) as separator."""
    scip = require_scip()
    prog.m.setObjective(prog.logit_gap(k, y), "maximize")
    prog.m.setSeparating(scip.SCIP_PARAMSETTING.OFF)
    prog.m.setPresolve(scip.SCIP_PARAMSETTING.OFF)
    prog.m.setHeuristics(scip.SCIP_PARAMSETTING.OFF)
    prog.m.setParam("numerics/feastol", 1e-9)
    if cuts:
        prog.add_ideal_cuts()
    prog.m.setParam("limits/nodes", 1)
    prog.m.optimize()
    root = float(prog.m.getDualbound())
    prog.m.setParam("limits/nodes", -1)
    prog.m.optimize()
    assert prog.m.getStatus() == "optimal"
    return root, float(prog.m.getObjVal())


def test_ideal_cuts_tighten_the_root_and_keep_the_optimum() -> None:
    """The cuts are valid (the optimum of every program is unchanged) and not idle (the root relaxation is
    never looser with them, and strictly tighter on some program)."""
    gen = torch.Generator().manual_seed(5)
    ops = [Reshape((1, 2, 2), (4,)), _dense(gen, 16, 4), ReLU((16,)), _dense(gen, 16, 16), ReLU((16,))]
    ops.append(_dense(gen, 3, 16))
    graph = Graph.from_ops(ops, (1, 2, 2))
    tighter = 0
    for _ in range(4):
        x0 = torch.rand(1, 2, 2, generator=gen, dtype=torch.float64)
        inset = InputSet(x0.flatten()[None], torch.tensor([0.3], dtype=torch.float64), math.inf, True)
        bounds = layer_bounds(graph, inset)
        y = int(graph.forward(x0[None])[0].argmax())
        for k in {0, 1, 2} - {y}:
            plain = _root_and_optimum(
                MilpProgram(require_scip(), network_blocks(graph), bounds, x0, inset), k, y, False
            )
            cut = _root_and_optimum(
                MilpProgram(require_scip(), network_blocks(graph), bounds, x0, inset), k, y, True
            )
            assert math.isclose(cut[1], plain[1], rel_tol=1e-6, abs_tol=1e-7)
            assert cut[0] <= plain[0] + 1e-7
            tighter += cut[0] < plain[0] - 1e-4
    assert tighter > 0
