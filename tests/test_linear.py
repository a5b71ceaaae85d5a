"""Closed-form linear margins against independent methods: LPs / a QP for the distance to a polyhedron,
black-box bisection on predictions, and a per-point brute-force loop."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn

from marginlab.base.errors import ConfigError, DataError
from marginlab.core.linear import binary_margins, linear_margins, minimal_adversarial
from marginlab.core.norms import Norm

P_NORMS = [1, 2, math.inf]


def _model(k: int = 4, d: int = 6, n: int = 40, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return w, b, x, y


def _min_norm(m: np.ndarray, h: np.ndarray, p: float) -> float:
    """min ||delta||_p subject to m @ delta <= h, by an LP (p = 1, inf) or SLSQP (p = 2)."""
    r, d = m.shape
    if p == math.inf:  # variables [delta, t]: minimise t with |delta_i| <= t
        eye = np.eye(d)
        a = np.vstack([np.hstack([m, np.zeros((r, 1))]), np.hstack([eye, -np.ones((d, 1))]),
                       np.hstack([-eye, -np.ones((d, 1))])])  # fmt: skip
        res = linprog(np.r_[np.zeros(d), 1.0], A_ub=a, b_ub=np.r_[h, np.zeros(2 * d)], bounds=(None, None))
        assert res.status == 0
        return float(res.fun)
    if p == 1:  # delta = u - v with u, v >= 0: minimise sum(u + v)
        res = linprog(np.ones(2 * d), A_ub=np.hstack([m, -m]), b_ub=h, bounds=(0, None))
        assert res.status == 0
        return float(res.fun)
    cons = {"type": "ineq", "fun": lambda z: h - m @ z, "jac": lambda z: -m}
    res = minimize(lambda z: z @ z, np.zeros(d), jac=lambda z: 2 * z, constraints=[cons], method="SLSQP",
                   options={"ftol": 1e-14, "maxiter": 500})  # fmt: skip
    assert res.success
    return float(np.sqrt(res.fun))


def _pairwise_rows(w, b, x, y):
    """Rows a_k = w_y - w_k and offsets g_k = a_k.x + b_y - b_k for k != y (numpy)."""
    ks = [k for k in range(len(w)) if k != y]
    a = (w[y] - w[ks]).numpy()
    return a, a @ x.numpy() + (b[y] - b[ks]).numpy()


@pytest.mark.parametrize(
    ("p", "expected"),
    [(1, math.inf), ("1", math.inf), ("l1", math.inf), (2, 2.0), (2.0, 2.0), ("2", 2.0), ("L2", 2.0)]
    + [(math.inf, 1.0), ("inf", 1.0), ("linf", 1.0), (" Linf ", 1.0)],
)
def test_dual_exponent_accepts_aliases(p, expected):
    assert Norm.parse(p).q == expected


@pytest.mark.parametrize("p", [3, 0.5, "l3", "", "two"])
def test_dual_exponent_rejects_other_norms(p):
    with pytest.raises(ConfigError):
        Norm.parse(p)


@pytest.mark.parametrize("p", P_NORMS)
def test_correct_points_match_distance_to_complement(p):
    # the complement of F_y is the union of the open halfspaces g_k < 0: min over k of one LP each
    w, b, x, y = _model(n=15, seed=1)
    m = linear_margins(w, b, x, y, p=p)
    checked = 0
    for i in range(len(x)):
        if m[i] <= 0:
            continue
        a, g = _pairwise_rows(w, b, x[i], int(y[i]))
        ref = min(_min_norm(a[j : j + 1], -g[j : j + 1], p) for j in range(len(a)))
        assert m[i].item() == pytest.approx(ref, rel=1e-6, abs=1e-8)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("p", P_NORMS)
def test_misclassified_points_bound_distance_to_region(p):
    # documented claim: for m < 0, -m <= dist_p(x, F_y), with equality for two classes
    for k, exact in [(2, True), (5, False)]:
        w, b, x, y = _model(k=k, n=30, seed=2)
        m = linear_margins(w, b, x, y, p=p)
        checked = strict = 0
        for i in torch.nonzero(m < 0).flatten().tolist():
            a, g = _pairwise_rows(w, b, x[i], int(y[i]))
            dist = _min_norm(-a, g, p)  # x + delta in F_y  <=>  -a @ delta <= g
            assert -m[i].item() <= dist * (1 + 1e-6) + 1e-9
            if exact:
                assert -m[i].item() == pytest.approx(dist, rel=1e-6)
            strict += -m[i].item() < dist * (1 - 1e-3)
            checked += 1
        assert checked >= 3, f"K={k}: only {checked} misclassified points to check"
        if not exact:  # for K >= 3 the bound is not always tight: some point shows it
            assert strict > 0


def test_multiclass_matches_per_point_loop():
    w, b, x, y = _model(k=7, d=12, n=25, seed=3)
    for p, q in [(1, math.inf), (2, 2), (math.inf, 1)]:
        ref = [
            min(
                ((w[y[i]] - w[k]) @ x[i] + b[y[i]] - b[k]) / torch.linalg.vector_norm(w[y[i]] - w[k], ord=q)
                for k in range(7)
                if k != y[i]
            )
            for i in range(len(x))
        ]
        torch.testing.assert_close(linear_margins(w, b, x, y, p=p), torch.stack(ref))
        torch.testing.assert_close(linear_margins(w, b, x, y, p=p, signed=False), torch.stack(ref).abs())


def test_binary_agrees_with_two_class_multiclass():
    w, b, x, _ = _model(k=1, n=30, seed=4)
    y01 = (x @ w[0] + b[0] > 0).long()
    y01[:5] = 1 - y01[:5]  # some misclassified points
    y_pm = 2 * y01 - 1
    two = torch.stack([-w[0] / 2, w[0] / 2])  # w_1 - w_0 = w, b_1 - b_0 = b
    for p in P_NORMS:
        mb = binary_margins(w[0], b[0], x, y_pm, p=p)
        torch.testing.assert_close(mb, linear_margins(two, torch.stack([-b[0] / 2, b[0] / 2]), x, y01, p=p))
        torch.testing.assert_close(binary_margins(w[0], b[0], x, y_pm, p=p, signed=False), mb.abs())
    assert (mb[:5] < 0).any() and (mb[5:] > 0).all()


def _flip_distance(w, b, x0, y0, direction, hi=100.0, steps=60):
    """Smallest t along x0 + t * direction where the predicted class stops being y0 (black-box bisection)."""
    pred = lambda t: int(torch.argmax(w @ (x0 + t * direction) + b))  # noqa: E731
    if pred(hi) == y0:
        return math.inf
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pred(mid) == y0 else (lo, mid)
    return hi


@pytest.mark.parametrize("p", P_NORMS)
def test_bisection_along_adversarial_and_random_directions(p):
    w, b, x, y = _model(k=5, n=30, seed=5)
    y = torch.argmax(x @ w.T + b, dim=1)  # all correctly classified
    m = linear_margins(w, b, x, y, p=p)
    adv = minimal_adversarial(w, b, x, y, p=p)
    g = torch.Generator().manual_seed(0)
    for i in range(len(x)):
        seg = adv.x[i] - x[i]
        t = _flip_distance(w, b, x[i], int(y[i]), seg / torch.linalg.vector_norm(seg, ord=p))
        assert t == pytest.approx(m[i].item(), rel=1e-6)
        for u in torch.randn(10, x.shape[1], generator=g, dtype=torch.float64):
            assert _flip_distance(w, b, x[i], int(y[i]), u / torch.linalg.vector_norm(u, ord=p)) >= m[i] * (
                1 - 1e-9
            )


@pytest.mark.parametrize("p", P_NORMS)
def test_minimal_adversarial_multiclass(p):
    w, b, x, _ = _model(k=6, n=60, seed=6)
    y = torch.argmax(x @ w.T + b, dim=1)
    y[:20] = (y[:20] + 1) % 6  # a third misclassified
    m = linear_margins(w, b, x, y, p=p)
    adv = minimal_adversarial(w, b, x, y, p=p, overshoot=1e-6)
    correct = m > 0
    assert correct.sum() > 5 and (~correct).sum() > 5
    pred = torch.argmax(adv.x @ w.T + b, dim=1)
    assert (pred[correct] != y[correct]).all()
    assert (pred[correct] == adv.target[correct]).all()
    torch.testing.assert_close(adv.norm[correct], m[correct] * (1 + 1e-6))
    torch.testing.assert_close(torch.linalg.vector_norm(adv.x - x, ord=p, dim=1), adv.norm)
    assert torch.equal(adv.x[~correct], x[~correct]) and (adv.target[~correct] == -1).all()


@pytest.mark.parametrize("p", P_NORMS)
def test_minimal_adversarial_binary_images(p):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(20, 1, 3, 3, generator=g)  # float32 images, flattened internally
    w, b = torch.randn(9, generator=g), 0.1
    y = torch.where(x.flatten(1) @ w + b > 0, 1, -1)
    adv = minimal_adversarial(w, b, x, y, p=p, overshoot=1e-3)
    assert adv.x.shape == x.shape and adv.x.dtype == torch.float32
    assert (torch.sign(adv.x.flatten(1) @ w + b) == -y).all()
    assert (adv.target == -y).all()
    torch.testing.assert_close(adv.norm, binary_margins(w, b, x, y, p=p) * 1.001)
    torch.testing.assert_close(torch.linalg.vector_norm((adv.x - x).flatten(1), ord=p, dim=1), adv.norm)
    y[0] = -y[0]  # now misclassified: unchanged, target 0
    again = minimal_adversarial(w, b, x, y, p=p)
    assert torch.equal(again.x[0], x[0]) and again.target[0] == 0 and again.norm[0] == 0


def test_float32_is_accurate_when_logits_dwarf_the_margins():
    # a large component shared by all classes cancels in w_y - w_k but not in the logits
    w, b, x, y = _model(k=5, d=50, n=200, seed=8)
    w_big = w + 1e4 * torch.randn(50, dtype=torch.float64)
    w32, b32, x32 = w_big.float(), b.float(), x.float()
    ref = linear_margins(w32.double(), b32.double(), x32.double(), y)  # same inputs, float64 arithmetic
    got = linear_margins(w32, b32, x32, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_zero_norm_pairs():
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    zeros = torch.zeros(4, dtype=torch.long)
    assert (linear_margins(w, torch.tensor([1.0, 0.0]), x, zeros) == math.inf).all()
    assert (linear_margins(w, torch.tensor([0.0, 1.0]), x, zeros) == -math.inf).all()
    assert (linear_margins(w, torch.zeros(2), x, zeros) == 0).all()
    # a degenerate pair is ignored when its class can never win: the third class decides
    w3 = torch.cat([w, torch.tensor([[0.0, 1.0, 0.0]])]).double()
    b3 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    ref = (x @ (w3[0] - w3[2]) + 1.0) / (w3[0] - w3[2]).norm()
    torch.testing.assert_close(linear_margins(w3, b3, x, zeros), ref)
    assert torch.isinf(minimal_adversarial(w, torch.tensor([1.0, 0.0]), x, zeros).norm).all()
    assert (binary_margins(torch.zeros(3), 0.0, x, torch.ones(4)) == 0).all()


def test_nn_linear_and_image_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(12, 3)
    x = torch.rand(10, 3, 2, 2)
    y = torch.randint(0, 3, (10,))
    ref = linear_margins(layer.weight, layer.bias, x.flatten(1), y)
    torch.testing.assert_close(linear_margins(layer, None, x, y), ref)
    with pytest.raises(ConfigError, match="bias=None"):
        linear_margins(layer, layer.bias, x, y)
    no_bias = nn.Linear(12, 3, bias=False)
    torch.testing.assert_close(
        linear_margins(no_bias, None, x, y), linear_margins(no_bias.weight, None, x, y)
    )


def test_bad_inputs_raise_marginlab_errors():
    w, b, x, y = _model()
    with pytest.raises(DataError):
        linear_margins(w, b, x, y + 10)
    with pytest.raises(ConfigError, match="features"):
        linear_margins(w, b, x[:, :3], y)
    with pytest.raises(ConfigError, match="binary_margins"):
        linear_margins(w[:1], b[:1], x, y)
    with pytest.raises(DataError, match="pm1"):
        binary_margins(w[0], b[0], x, y)
    with pytest.raises(ConfigError, match="labels"):
        linear_margins(w, b, x, y[:3])
    with pytest.raises(ConfigError):
        minimal_adversarial(w, b, x, y, overshoot=-1.0)
