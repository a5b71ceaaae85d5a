"""Certified radii of ``crown`` (bounds/crown.py, estimators/crown.py) on every supported layer type: no
point sampled in the certified ball, nor the end of a PGD attack inside it, changes the prediction;
alpha-CROWN is at least as tight and still sound; the fixed-bounds radius, the L2-in-the-box minimum and
the memory budget against brute-force references; linear models recover the closed form in R^d."""

import logging
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.datasets import load_digits
from torch import nn

from marginlab.bounds import crown as crown_bounds
from marginlab.bounds.alpha import optimized_rows
from marginlab.bounds.crown import layer_bounds, lower_bounds, margin_spec, spec_rows
from marginlab.bounds.domain import InputSet, largest_radius
from marginlab.bounds.graph import Graph
from marginlab.bounds.network import network_ops
from marginlab.bounds.ops import Dense, Reshape
from marginlab.core.linear import linear_margins
from marginlab.estimators import crown as crown_estimator
from marginlab.estimators.crown import certified_radius
from test_crown_nets import GRAPHS, activations, ball_samples, pgd_in_ball


def _points(graph: Graph, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [n,*in]`` in the box, labels ``y`` (the first two flipped: misclassified) and signs."""
    x = torch.rand(n, *graph.in_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        y = activations(graph, x)[-1].argmax(1)
    y[:2] = (y[:2] + 1) % graph.num_classes
    return x, y, torch.where(torch.arange(n) < 2, -1.0, 1.0).double()


def _check_ball(
    graph: Graph, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, p: float, box: bool
) -> None:
    """No sampled point and no PGD end point of the balls is classified otherwise than certified."""
    good = torch.arange(len(x)) >= 2
    gen = torch.Generator().manual_seed(9)
    xs = ball_samples(x, radius, p, 200, gen, box)
    attacked = pgd_in_ball(graph, x, y, radius, p, box)
    for pts in (xs.flatten(0, 1), attacked):
        with torch.no_grad():
            pred = activations(graph, pts)[-1].argmax(1).view(-1, len(x))
        assert (pred[:, good] == y[good]).all()
        assert (pred[:, ~good] != y[~good]).all()


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_no_point_of_the_certified_ball_changes_the_prediction(name: str, p: float) -> None:
    graph = GRAPHS[name]()
    box = name != "mlp"  # the MLP in R^d, the others in the box
    x, y, sign = _points(graph, 5, seed=3)
    radius = certified_radius(graph, x, y, sign, p=p, box=box, rtol=1e-2)
    assert (radius > 0).all() and torch.isfinite(radius).all()
    _check_ball(graph, x, y, radius, p, box)


@pytest.fixture(scope="module")
def trained_cnn() -> tuple[list, torch.Tensor, torch.Tensor]:
    """A small CNN (conv stride 2, max- and average pooling) trained briefly on 8x8 digits."""
    d = load_digits()
    x = torch.tensor(d.data / 16, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        for idx in torch.randperm(800).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return network_ops(model.eval(), (1, 8, 8)), x[-8:].double(), y[-8:]


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
def test_a_trained_cnn_is_sound_and_alpha_crown_is_tighter_and_sound(trained_cnn, p: float) -> None:
    ops, x, y = trained_cnn
    graph = Graph.from_ops(ops, (1, 8, 8))
    with torch.no_grad():
        pred = activations(graph, x)[-1].argmax(1)
    y = torch.cat([(pred[:2] + 1) % 10, pred[2:]])  # two misclassified points
    sign = torch.where(torch.arange(len(x)) < 2, -1.0, 1.0).double()
    radius = certified_radius(graph, x, y, sign, p=p, box=True, rtol=1e-2)
    _check_ball(graph, x, y, radius, p, box=True)
    # alpha-CROWN at twice the radius: never below CROWN (it starts there), and a bound of the samples
    eps = 2 * radius
    inset = InputSet(x.flatten(1), eps, p, True)
    bounds = layer_bounds(graph, inset)
    spec = margin_spec(y, 10, sign)
    crown = inset.concretize(spec_rows(graph, bounds, spec)[0]) + spec_rows(graph, bounds, spec)[1]
    a, d = optimized_rows(graph, bounds, spec, inset, steps=15, crown_budget=1 << 22)
    alpha = inset.concretize(a) + d
    assert (alpha >= crown - 1e-12).all() and (alpha > crown + 1e-6).any()
    xs = ball_samples(x, eps, p, 300, torch.Generator().manual_seed(4), box=True)
    with torch.no_grad():
        values = torch.einsum(
            "bsk,nbk->nbs", spec, activations(graph, xs.flatten(0, 1))[-1].view(300, len(x), 10)
        )
    assert (values.amin(0) >= alpha - 1e-9).all()


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
def test_a_linear_model_in_rd_gets_its_closed_form_margin_from_the_first_failed_pass(
    p: float, monkeypatch
) -> None:
    gen = torch.Generator().manual_seed(6)
    w, b = torch.randn(4, 12, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen).double()
    graph = Graph.from_ops([Reshape((3, 2, 2), (12,)), Dense(w, b)], (3, 2, 2))
    x = torch.rand(8, 3, 2, 2, generator=gen, dtype=torch.float64)
    y = (x.flatten(1) @ w.T + b).argmax(1)
    exact = linear_margins(w, b, x, y, p=p)
    passes = []
    one_pass = crown_estimator._pass
    monkeypatch.setattr(crown_estimator, "_pass", lambda *a: passes.append(1) or one_pass(*a))
    radius = certified_radius(graph, x, y, torch.ones(8).double(), p=p, box=False, hi=3 * exact, rtol=1e-6)
    assert (radius <= exact).all() and torch.allclose(radius, exact, rtol=1e-8)
    assert len(passes) <= 2  # the pass at hi fails with g = the margin, the one just above it ends it


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
@pytest.mark.parametrize("box", [False, True], ids=["rd", "box"])
def test_the_fixed_bounds_radius_is_the_largest_radius_where_the_bound_stays_positive(
    p: float, box: bool
) -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(5, 3, 10, generator=gen, dtype=torch.float64)
    x0 = torch.rand(5, 10, generator=gen, dtype=torch.float64)
    d = 1.0 - (a * x0[:, None]).sum(2) + 0.3 * torch.randn(5, 3, generator=gen).double()
    hi = torch.full((5,), 2.0, dtype=torch.float64)
    every = torch.tensor([True, True, False, True, False])
    r = largest_radius(a, d, x0, p=p, box=box, hi=hi, every=every)

    def ok(radius: torch.Tensor) -> torch.Tensor:
        low = InputSet(x0, radius, p, box).concretize(a) + d
        return torch.where(every, low.amin(1) > 0, low.amax(1) > 0)

    assert (ok(r) | (r == 0)).all()  # certified where positive
    above = (r * (1 + 1e-6) + 1e-12).clamp(max=2.0)
    assert (~ok(above) | (r == 2.0)).all()  # and the largest such radius (to the bisection's precision)


def test_the_l2_minimum_in_the_box_is_exact() -> None:
    gen = torch.Generator().manual_seed(8)
    x0 = torch.rand(2, 12, generator=gen, dtype=torch.float64)
    x0[:, :4], x0[:, 4:6] = 0.0, 1.0  # on the faces of the box
    a = torch.randn(2, 3, 12, generator=gen, dtype=torch.float64)
    for eps in (0.05, 0.4, 1.5, 5.0):
        got = InputSet(x0, torch.full((2,), eps, dtype=torch.float64), 2.0, True).concretize(a)
        for i in range(2):
            for s in range(3):
                av, xv = a[i, s].numpy(), x0[i].numpy()
                ball = {"type": "ineq", "fun": lambda z, xv=xv, e=eps: e**2 - ((z - xv) ** 2).sum()}
                options = {"ftol": 1e-13, "maxiter": 300}
                ref = minimize(lambda z, av=av: av @ z, xv, jac=lambda z, av=av: av, bounds=[(0, 1)] * 12,
                               constraints=[ball], method="SLSQP", options=options)  # fmt: skip
                # SLSQP may stop a hair outside the ball (by ~1e-9); pulled back onto the box and
                # toward x0 into the ball, its point is feasible, so its value bounds the minimum above
                z = np.clip(ref.x, 0.0, 1.0)
                z = xv + (z - xv) * min(1.0, eps / max(float(np.linalg.norm(z - xv)), 1e-300))
                feasible = float(av @ z)
                assert float(got[i, s]) <= feasible + 1e-12  # a lower bound (weak duality)
                assert float(got[i, s]) >= feasible - 1e-6  # and the minimum itself


def test_a_small_budget_gives_the_same_bounds_in_chunks_and_a_tiny_one_falls_back_to_intervals(
    caplog,
) -> None:
    graph = GRAPHS["conv"]()
    x = torch.rand(3, 2 * 9 * 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inset = InputSet(x, torch.full((3,), 0.05, dtype=torch.float64), math.inf, True)
    big, small = layer_bounds(graph, inset), layer_bounds(graph, inset, crown_budget=3000)
    assert all(torch.allclose(big[k][i], small[k][i], rtol=0, atol=1e-12) for k in big for i in (0, 1))
    with caplog.at_level(logging.WARNING, logger="marginlab.bounds.crown"):
        tiny = layer_bounds(graph, inset, crown_budget=200)
    assert "interval bounds" in caplog.text
    assert all(
        (tiny[k][0] <= big[k][0] + 1e-12).all() and (tiny[k][1] >= big[k][1] - 1e-12).all() for k in big
    )
    assert any((tiny[k][0] < big[k][0] - 1e-6).any() for k in big)  # a layer kept its interval bounds
    spec = margin_spec(torch.zeros(3, dtype=torch.long), 4, torch.ones(3))
    x4 = x.view(3, 2, 9, 9)
    assert (lower_bounds(graph, x4, inset.eps, spec, p=math.inf, box=True, crown_budget=200)
            <= lower_bounds(graph, x4, inset.eps, spec, p=math.inf, box=True) + 1e-12).all()  # fmt: skip


def test_prior_bounds_from_a_larger_ball_are_kept_spare_rows_and_stay_sound(monkeypatch) -> None:
    graph = GRAPHS["residual"]()
    x = torch.rand(3, 2 * 8 * 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    big = layer_bounds(graph, InputSet(x, torch.full((3,), 0.3, dtype=torch.float64), 2.0, True))
    small_set = InputSet(x, torch.full((3,), 0.2, dtype=torch.float64), 2.0, True)
    rows: list[int] = []
    needs = crown_bounds.needs_rows
    monkeypatch.setattr(
        crown_bounds, "needs_rows", lambda *a: rows.append(int((out := needs(*a)).sum())) or out
    )
    layer_bounds(graph, small_set)
    fresh_rows, rows[:] = sum(rows), []
    reused = layer_bounds(graph, small_set, prior=big)
    assert sum(rows) < fresh_rows  # neurons the prior proves stable get no rows
    for k, (lo, hi) in reused.items():
        assert (lo >= big[k][0]).all() and (hi <= big[k][1]).all()
    xs = ball_samples(x.view(3, 2, 8, 8), small_set.eps, 2.0, 200, torch.Generator().manual_seed(3), True)
    outs = activations(graph, xs.flatten(0, 1))
    for k, (lo, hi) in reused.items():
        z = outs[graph.nodes[k].inputs[0]].reshape(200, *lo.shape)
        assert (z >= lo - 1e-9).all() and (z <= hi + 1e-9).all()
