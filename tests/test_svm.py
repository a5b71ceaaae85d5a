"""Hard-margin SVM against hand-solved sets and an independent QP (SLSQP), and the separability check."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from marginlab.base.errors import ConfigError, DataError, NotSeparableError
from marginlab.core.svm import direction_cosine, hard_margin_svm

BIASES = ["free", "regularized", "none"]


def _qp_svm(x: np.ndarray, y: np.ndarray, bias: str) -> tuple[np.ndarray, float]:
    """Reference: min ||w||^2 (+ b^2 if regularized) s.t. y (w.x + b) >= 1, solved by SLSQP."""
    d = x.shape[1]
    z = np.hstack([x, np.ones((len(x), 1))])
    reg = np.r_[np.ones(d), 1.0 if bias == "regularized" else 0.0]
    cons = [{"type": "ineq", "fun": lambda t: y * (z @ t) - 1, "jac": lambda t: y[:, None] * z}]
    if bias == "none":
        cons.append({"type": "eq", "fun": lambda t: t[-1:], "jac": lambda t: np.eye(d + 1)[-1:]})
    res = minimize(lambda t: t @ (reg * t), np.zeros(d + 1), jac=lambda t: 2 * reg * t, constraints=cons,
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})  # fmt: skip
    assert res.success
    return res.x[:d], float(res.x[d])


def _separable(n: int = 40, d: int = 5, seed: int = 0, offset: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n, d)) + offset  # away from the origin, so the three bias treatments differ
    s = x @ w - np.median(x @ w)
    keep = np.abs(s) > 0.3  # a gap around the true boundary
    return x[keep], np.where(s[keep] > 0, 1.0, -1.0)


@pytest.mark.parametrize("bias", BIASES)
def test_two_symmetric_points(bias):
    res = hard_margin_svm(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([1, -1]), bias=bias)
    torch.testing.assert_close(res.w, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    assert res.w.dtype == torch.float64
    assert res.b == pytest.approx(0.0, abs=1e-4)
    assert res.margin == pytest.approx(1.0, rel=1e-4)
    assert res.n_support == 2


def test_four_points_by_hand():
    # rows y = 0 (class -1) and y = 2 (class +1): the boundary is y = 1, w = (0, 1), b = -1, margin 1
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
    res = hard_margin_svm(x, torch.tensor([-1, -1, 1, 1]))
    torch.testing.assert_close(res.w, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-4, rtol=0)
    assert res.b == pytest.approx(-1.0, abs=1e-4)
    assert res.margin == pytest.approx(1.0, rel=1e-4)
    assert res.n_support == 4


def test_one_dimension_bias_treatments():
    # x = 1 (class -1), x = 3 (class +1): with a bias w = 1, b = -2 (both constraints active, so the
    # regularized bias gives the same); through the origin no line separates them
    x, y = torch.tensor([[1.0], [3.0]]), torch.tensor([-1.0, 1.0])
    for bias in ["free", "regularized"]:
        res = hard_margin_svm(x, y, bias=bias)
        assert res.w.item() == pytest.approx(1.0, abs=1e-4) and res.b == pytest.approx(-2.0, abs=1e-4)
    with pytest.raises(NotSeparableError, match="not linearly separable"):
        hard_margin_svm(x, y, bias="none")


@pytest.mark.parametrize("bias", BIASES)
def test_matches_independent_qp(bias):
    x, y = _separable()
    w_ref, b_ref = _qp_svm(x, y, bias)
    res = hard_margin_svm(x, y, bias=bias, tol=1e-4)
    np.testing.assert_allclose(res.w.numpy(), w_ref, atol=1e-3 * np.abs(w_ref).max())
    assert res.b == pytest.approx(b_ref, abs=1e-3 * max(1.0, abs(b_ref)))
    margin_ref = float((y * (x @ w_ref + b_ref)).min() / np.linalg.norm(w_ref))
    assert res.margin == pytest.approx(margin_ref, rel=1e-4)
    assert direction_cosine(res.w, res.b, torch.from_numpy(w_ref), b_ref) > 1 - 1e-6


def test_bias_treatments_differ_and_free_has_the_largest_margin():
    x, y = _separable(seed=1)
    res = {bias: hard_margin_svm(x, y, bias=bias) for bias in BIASES}
    assert res["free"].margin >= res["regularized"].margin >= res["none"].margin * (1 - 1e-4)
    assert direction_cosine(res["free"].w, res["free"].b, res["regularized"].w, res["regularized"].b) < 0.9999
    assert res["none"].b == 0.0


@pytest.mark.parametrize("bias", BIASES)
def test_non_separable_raises(bias):
    xor = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(NotSeparableError, match="not linearly separable"):
        hard_margin_svm(xor, torch.tensor([1, 1, -1, -1]), bias=bias)


def test_overlapping_clouds_raise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    with pytest.raises(NotSeparableError):
        hard_margin_svm(x, np.where(rng.random(200) > 0.5, 1, -1))


def test_image_shaped_inputs_and_bad_arguments():
    x = torch.rand(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x[3:] += 2.0
    res = hard_margin_svm(x, torch.tensor([-1, -1, -1, 1, 1, 1]))
    assert res.w.shape == (4,) and res.margin > 0
    with pytest.raises(DataError, match="pm1"):
        hard_margin_svm(x, torch.tensor([0, 0, 0, 1, 1, 1]))
    with pytest.raises(DataError, match="both classes"):
        hard_margin_svm(x, torch.ones(6))
    with pytest.raises(ConfigError):
        hard_margin_svm(x, torch.ones(5))
    with pytest.raises(ConfigError, match="bias"):
        hard_margin_svm(x, torch.tensor([-1, -1, -1, 1, 1, 1]), bias="penalised")  # type: ignore[arg-type]


def test_direction_cosine():
    w = torch.tensor([1.0, 0.0])
    assert direction_cosine(w, 0.0, 2 * w, 0.0) == pytest.approx(1.0)
    assert direction_cosine(w, 1.0, -w, -1.0) == pytest.approx(-1.0)
    assert direction_cosine(w, 1.0, w, -1.0) == pytest.approx(0.0)  # the bias counts as a coordinate
    assert direction_cosine(torch.tensor([3.0, 0.0]), 4.0, torch.tensor([0.0, 1.0]), 0.0) == pytest.approx(
        0.0
    )
    assert direction_cosine(torch.tensor([3.0, 0.0]), 4.0, torch.tensor([1.0, 0.0]), 0.0) == pytest.approx(
        0.6
    )
    assert math.isnan(direction_cosine(torch.zeros(2), 0.0, w, 0.0))
    with pytest.raises(ConfigError):
        direction_cosine(w, 0.0, torch.ones(3), 0.0)


@pytest.mark.slow
def test_mnist_zero_vs_one_is_separable_with_the_reference_margin():
    from marginlab.data import load_dataset

    data = load_dataset("mnist:0,1", "train", labels="pm1")
    assert len(data) == 12_665
    res = hard_margin_svm(data.x, data.y)
    assert res.margin == pytest.approx(0.4245, abs=2e-4)  # byte/255 pixels, bias free
    reg = hard_margin_svm(data.x, data.y, bias="regularized")
    assert reg.margin == pytest.approx(0.4094, abs=2e-4)
    assert direction_cosine(res.w, res.b, reg.w, reg.b) == pytest.approx(0.945, abs=2e-3)
