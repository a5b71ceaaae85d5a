"""Deep models: certified lower bounds never exceed attack upper bounds; Lipschitz constants are honest."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from conftest import margin_values
from marginlab.base.errors import ConfigError
from marginlab.estimators.lipschitz import conv_power_iteration, conv_spectral_bound, feature_lipschitz
from marginlab.nets.models import build_model

ATTACKS = ["deepfool", "ddn", "fmn", "fab"]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data / 16, dtype=torch.float32).view(-1, 1, 8, 8)
    return x, torch.tensor(d.target)


@pytest.fixture(scope="module")
def trained_mlp(digits):
    torch.manual_seed(0)
    x, y = digits
    return _train(build_model("mlp", input_shape=(1, 8, 8), widths=(32,)), x[:600], y[:600], epochs=8)


def _eval_points(digits, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits
    x, y = x[-n:].clone(), y[-n:].clone()
    y[:3] = (y[:3] + 1) % 10  # guarantee misclassified points: the sign rule is tested too
    return x, y


def _check_order(out: dict[str, torch.Tensor], model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.no_grad():
        correct = model.eval()(x).argmax(dim=1) == y  # eval: dropout off, as in the estimators
    assert (~correct).sum() >= 3 and correct.sum() >= 10
    for name, v in out.items():  # one sign convention: positive exactly when correctly classified
        assert torch.equal(v > 0, correct), name
    lower = out["lipschitz"].abs()
    for name in [*ATTACKS, "best"]:
        assert torch.isfinite(out[name]).all(), name
        assert (lower <= out[name].abs() * (1 + 1e-6)).all(), f"lipschitz above {name}"
    # A sanity check, not a theorem: the linearisation is not far above the best attack.
    assert (out["first-order"][correct] <= out["best"][correct] * 1.5).all()


def test_lower_bound_never_exceeds_any_attack_on_a_trained_mlp(trained_mlp, digits) -> None:
    x, y = _eval_points(digits, 40)
    names = ["lipschitz", "first-order", "sampling", *ATTACKS, "best"]
    params = {"sampling": {"n_batches": 2, "n_samples": 64}, "fab": {"n_iter": 30}}
    out = margin_values(trained_mlp, x, y, names, params=params)
    _check_order(out, trained_mlp, x, y)
    # The sampled maxima only see points inside the ball, so sampling >= the global Lipschitz bound.
    assert (out["sampling"].abs() >= out["lipschitz"].abs() * (1 - 1e-6)).all()


def test_lower_bound_never_exceeds_any_attack_on_a_small_cnn(digits) -> None:
    torch.manual_seed(0)
    x, y = digits
    cnn = build_model("cnn", input_shape=(1, 8, 8), channels=(8, 8), fc=(32,), padding=1, dropout=0.5)
    _train(cnn, x[:600], y[:600], epochs=8)
    xe, ye = _eval_points(digits, 24)
    names = ["lipschitz", "first-order", "deepfool", "ddn", "fmn", "fab", "best"]
    out = margin_values(cnn, xe, ye, names, params={"fab": {"n_iter": 30}})
    _check_order(out, cnn, xe, ye)


def _dense_norm(conv: nn.Conv2d, shape: tuple[int, int, int]) -> float:
    """Exact spectral norm of the conv as an explicit matrix (the independent reference)."""
    basis = torch.eye(math.prod(shape), dtype=torch.float64).view(-1, *shape)
    cols = F.conv2d(basis, conv.weight.detach().double(), stride=conv.stride, padding=conv.padding)
    return float(torch.linalg.matrix_norm(cols.flatten(1), ord=2))


@pytest.mark.parametrize(("padding", "stride", "slack"), [(0, 1, 1.1), (1, 1, 1.1), (1, 2, 1.5)])
def test_conv_bound_is_above_the_exact_norm_and_close_to_it(padding: int, stride: int, slack: float) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=padding, stride=stride)
    shape = (3, 9, 9)
    exact = _dense_norm(conv, shape)
    bound = conv_spectral_bound(conv, shape[1:])
    power = conv_power_iteration(conv, shape, iters=300)
    assert power <= exact * (1 + 1e-9)  # power iteration approaches from below
    assert power == pytest.approx(exact, rel=1e-3)
    assert exact <= bound * (1 + 1e-9)  # the certified bound is an upper bound ...
    assert bound <= slack * exact  # ... and not a loose one (strided convs drop rows: looser)


def test_network_lipschitz_bound_dominates_observed_slopes(trained_mlp, digits) -> None:
    x, _ = digits
    cnn = build_model("cnn", input_shape=(1, 8, 8), channels=(4, 4), fc=(16,), padding=1)
    for model in (trained_mlp, cnn):
        layers = list(model.phi)
        bound = feature_lipschitz(layers, x[:1])
        a, b = x[:200], x[:200] + 0.01 * torch.randn(200, 1, 8, 8)
        with torch.no_grad():
            slopes = (model.phi(a) - model.phi(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        assert slopes.max() <= bound


def test_lipschitz_rejects_layers_it_cannot_bound(digits) -> None:
    x, y = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)).eval()
    with pytest.raises(ConfigError, match="cannot bound layer BatchNorm1d"):
        margin_values(model, x[:4], y[:4], ["lipschitz"])
    with pytest.raises(ConfigError, match="nn.Sequential ending in nn.Linear"):
        margin_values(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU()), x[:4], y[:4], ["lipschitz"])
