"""Bound propagation (``marginlab.bounds``) and the ``crown`` estimator: exact on linear models,
sound by sampling inside the certified balls, never above the attacks' upper bounds."""

import math

import pytest
import torch
from torch import nn

import marginlab.bounds
from marginlab.base.errors import ConfigError
from marginlab.bounds import crown, domain, network, ops
from marginlab.bounds.crown import lower_bounds, margin_spec
from marginlab.bounds.network import network_ops
from marginlab.core.linear import linear_margins
from marginlab.estimators import build_estimator, combine_upper_bounds
from marginlab.nets.models import build_model

NORMS = [2.0, math.inf]


class Normalize(nn.Module):
    """A per-channel ``(x - mean) / std`` preprocessing module, as models may carry one."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _nets() -> dict[str, tuple[nn.Module, tuple[int, int, int]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4)
    )
    cnn = build_model("cnn", input_shape=(2, 10, 10), num_classes=4, channels=(3, 4), fc=(10,), pool_every=1)
    avg = nn.Sequential(
        Normalize([0.5, 0.4], [0.25, 0.3]),
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 8),
        nn.ReLU(),
        nn.Linear(8, 4),
    )
    return {"mlp": (mlp, (1, 4, 4)), "cnn-maxpool": (cnn, (2, 10, 10)), "normalize-avgpool": (avg, (2, 8, 8))}


def _ball_samples(x: torch.Tensor, eps: torch.Tensor, p: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n,B,*in]`` points of the balls (including points on the sphere and at the box's corners)."""
    d = torch.randn(n, *x.shape, generator=gen, dtype=x.dtype)
    if p == math.inf:
        d = torch.sign(d) * torch.rand(d.shape, generator=gen, dtype=x.dtype).pow(0.2)  # near the corners
    else:
        d = d / d.flatten(2).norm(dim=2).view(n, len(x), *[1] * (x.dim() - 1))
        d = d * torch.rand(n, len(x), *[1] * (x.dim() - 1), generator=gen, dtype=x.dtype).pow(0.2)
    return x + d * eps.view(1, -1, *[1] * (x.dim() - 1))


@pytest.mark.parametrize("name", ["mlp", "cnn-maxpool", "normalize-avgpool"])
@pytest.mark.parametrize("p", NORMS, ids=["l2", "linf"])
@pytest.mark.parametrize("box", [False, True], ids=["rd", "box"])
def test_logit_difference_bounds_hold_for_sampled_points(name: str, p: float, box: bool) -> None:
    model, shape = _nets()[name]
    model = model.double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, *shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    spec = margin_spec(y, 4, torch.ones(6))
    eps = torch.linspace(0.02, 0.3, 6, dtype=torch.float64) * (1 if p == math.inf else 3)
    low = lower_bounds(network_ops(model, shape), x, eps, spec, p=p, box=box)
    xs = _ball_samples(x, eps, p, 300, gen)
    if box:
        xs = xs.clamp(0, 1)
    with torch.no_grad():
        out = model(xs.flatten(0, 1)).view(300, 6, 4)
    values = torch.einsum("bsk,nbk->nbs", spec, out).amin(0)
    assert (low <= values + 1e-9).all()
    assert (values - low).mean() < 10  # bounds, not vacuous


@pytest.mark.parametrize("name", ["mlp", "cnn-maxpool", "normalize-avgpool"])
@pytest.mark.parametrize("p", NORMS, ids=["l2", "linf"])
def test_prediction_never_changes_inside_the_certified_ball(name: str, p: float) -> None:
    model, shape = _nets()[name]
    model.eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(10, *shape, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 4  # misclassified points: the whole ball stays out of the region of y
    crown = build_estimator("crown", rtol=1e-3)(model, x, y, p=p)
    assert torch.equal(crown > 0, torch.arange(10) >= 2)
    radius = crown.abs().clamp(max=10)
    xs = _ball_samples(x.double(), radius, p, 400, gen).clamp(0, 1).float()
    with torch.no_grad():
        pred = model(xs.flatten(0, 1)).argmax(1).view(400, 10)
    assert (pred[:, 2:] == y[2:]).all()
    assert (pred[:, :2] != y[:2]).all()


@pytest.mark.parametrize("p", NORMS, ids=["l2", "linf"])
def test_crown_equals_the_exact_margin_of_a_linear_model(p: float) -> None:
    torch.manual_seed(3)
    model = build_model("lr", input_shape=(1, 5, 5), num_classes=4)
    x = torch.rand(20, 1, 5, 5)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 4
    exact = linear_margins(model.head.weight.double(), model.head.bias.double(), x.double(), y, p=p)
    crown = build_estimator("crown", domain="rd", warm_start=False, rtol=1e-6)(model, x, y, p=p)
    correct = exact > 0
    assert (crown[correct] <= exact[correct] * (1 + 1e-9)).all()
    assert torch.allclose(crown[correct], exact[correct], rtol=2e-6)
    # misclassified: one class beats y on the whole ball, a lower bound of the distance into y's region
    assert (crown[~correct] < 0).all() and (crown[~correct] >= exact[~correct] - 1e-9).all()


def test_crown_on_a_linear_model_at_the_margin_bound_is_zero() -> None:
    """The bound propagated over the ball of radius = the exact margin is 0 for the binding class."""
    torch.manual_seed(4)
    model = build_model("lr", input_shape=(1, 3, 3), num_classes=3).double()
    x = torch.rand(5, 1, 3, 3, dtype=torch.float64)
    y = model(x).argmax(1)
    exact = linear_margins(model.head.weight, model.head.bias, x, y, p=2)
    low = lower_bounds(
        network_ops(model, (1, 3, 3)), x, exact, margin_spec(y, 3, torch.ones(5)), p=2, box=False
    )
    assert torch.allclose(low.min(1).values, torch.zeros(5, dtype=torch.float64), atol=1e-12)


@pytest.fixture(scope="module")
def digits_mlp():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), widths=(24, 24))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(6):
        for idx in torch.randperm(600).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[-30:], y[-30:]


@pytest.mark.parametrize("domain", ["box", "rd"])
def test_crown_is_below_every_attack_and_above_lipschitz(digits_mlp, domain: str) -> None:
    model, x, y = digits_mlp
    out = {
        name: build_estimator(name, **({"domain": domain} if name == "crown" else {}))(model, x, y)
        for name in ("crown", "lipschitz", "deepfool", "ddn")
    }
    out["best"] = combine_upper_bounds([out["deepfool"], out["ddn"]])
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert torch.equal(out["crown"] > 0, correct)
    for name in ("deepfool", "ddn", "best"):
        assert (out["crown"].abs() <= out[name].abs() * (1 + 1e-9)).all(), name
    assert (out["crown"].abs() >= out["lipschitz"].abs() * (1 - 1e-9)).all()
    # a bound that bites: well above the global Lipschitz bound (about 2x here, in L2 on a tiny MLP)
    assert out["crown"].abs().median() > 1.5 * out["lipschitz"].abs().median()


def test_unsupported_layers_and_domains_are_config_errors() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="Softplus"):
        build_estimator("crown")(model, torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="domain"):
        build_estimator("crown", domain="sphere")


# the public names of the 0.1 module ``marginlab.bounds`` and the module of the package that holds each now
OLD_BOUNDS_NAMES = {
    "DOMAINS": domain, "parse_domain": domain, "InputSet": domain,
    "Shape": ops, "Op": ops, "Affine": ops, "Dense": ops, "Conv": ops, "Scale": ops, "Reshape": ops,
    "ReLU": ops, "MaxPool": ops,
    "SUPPORTED": network, "network_ops": network,
    "CROWN_BUDGET": crown, "layer_bounds": crown, "lower_bounds": crown, "margin_spec": crown,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OLD_BOUNDS_NAMES))
def test_the_names_of_the_old_bounds_module_still_resolve(name: str) -> None:
    """``marginlab.bounds.lower_bounds`` (0.1, when ``bounds`` was one module) still works, with a warning."""
    new = OLD_BOUNDS_NAMES[name]
    with pytest.warns(DeprecationWarning, match=f"marginlab.bounds.{name} is deprecated; use {new.__name__}"):
        assert getattr(marginlab.bounds, name) is getattr(new, name)


def test_unknown_names_of_the_bounds_package_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        marginlab.bounds.nope  # noqa: B018
