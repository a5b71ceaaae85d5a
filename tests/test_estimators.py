"""Estimators on linear models against an independent closed form, and the shared interface."""

import math

import pytest
import torch

from conftest import margin_values
from marginlab.base.errors import ConfigError
from marginlab.estimators import ESTIMATORS, MarginKind, build_estimator
from marginlab.nets.models import build_model

SHAPE = (1, 6, 6)


def closed_form(model, x: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """min_{k != y} ((w_y - w_k)·x + b_y - b_k) / ||w_y - w_k||_q, written out here on purpose."""
    w, b = model.head.weight.detach().double(), model.head.bias.detach().double()
    f = x.flatten(1).double() @ w.T + b
    out = torch.empty(len(x), dtype=torch.float64)
    for i in range(len(x)):
        ratios = [
            (f[i, y[i]] - f[i, k]) / torch.linalg.vector_norm(w[y[i]] - w[k], ord=q)
            for k in range(w.shape[0])
            if k != y[i]
        ]
        out[i] = min(ratios)
    return out


def linear_problem(k: int, n: int, seed: int = 0):
    """A nearest-centroid linear model (w_k = mu_k, b_k = -||mu_k||^2 / 2) with points scattered
    around centres inside [0.3, 0.7]^36: margins ~0.4 (L2), ~0.1 (Linf) whose nearest boundary points
    stay inside [0, 1]^36, where the attacks are confined. Logits are scaled by 10 (margins do not
    change) to make the model as confident as a trained one: DDN's cross-entropy steps need it."""
    gen = torch.Generator().manual_seed(seed)
    mu = 0.3 + 0.4 * torch.rand(k, 36, generator=gen)
    model = build_model("lr", input_shape=SHAPE, num_classes=k)
    with torch.no_grad():
        model.head.weight.copy_(10 * mu)
        model.head.bias.copy_(-5 * (mu**2).sum(dim=1))
    labels = torch.arange(n) % k
    x = (mu[labels] + 0.05 * torch.randn(n, 36, generator=gen)).clamp(0, 1).view(n, *SHAPE)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y


@pytest.fixture(scope="module")
def linear4():
    model, x, y = linear_problem(k=4, n=16)
    assert len(y.unique()) == 4
    return model, x, y


@pytest.mark.parametrize("p", [2, math.inf], ids=["L2", "Linf"])
@pytest.mark.parametrize("name", ["exact-linear", "first-order", "lipschitz", "sampling"])
def test_non_attack_estimators_equal_the_closed_form_on_linear_models(linear4, name, p) -> None:
    model, x, y = linear4
    y = y.clone()
    y[:4] = (y[:4] + 1) % 4  # a few misclassified points: negative margins, same formula
    params = {"n_batches": 2, "n_samples": 16, "radius": 50.0} if name == "sampling" else {}
    got = build_estimator(name, **params)(model, x, y, p=p)
    want = closed_form(model, x, y, 2.0 if p == 2 else 1.0)
    assert got.dtype == torch.float64 and got.shape == (len(x),)
    assert (got[:4] < 0).all() and (got[4:] > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sampling_is_capped_at_its_radius(linear4) -> None:
    model, x, y = linear4
    want = closed_form(model, x, y, 2.0)
    radius = float(want.median())
    got = build_estimator("sampling", radius=radius, n_batches=1, n_samples=8)(model, x, y)
    torch.testing.assert_close(got, want.clamp(max=radius), rtol=1e-5, atol=1e-6)


# Attack tolerances: DeepFool overshoots by 2%, FAB by 5% of the last step; DDN and FMN converge
# (FMN follows the currently second-best class, so one point may end on a farther boundary).
ATTACKS = {"deepfool": 0.025, "ddn": 0.01, "fmn": 0.01, "fab": 0.01}
# FAB projects exactly onto the linearised boundary, so on a linear model it converges within a few
# of its 100 default iterations; 20 keep the tests fast.
PARAMS = {"fab": {"n_iter": 20}}


@pytest.mark.parametrize("p", [2, math.inf], ids=["L2", "Linf"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_find_the_closed_form_margin_of_linear_models(linear4, name, p) -> None:
    if p != 2 and name == "ddn":
        pytest.skip("DDN is L2 only")
    model, x, y = linear4
    got = build_estimator(name, **PARAMS.get(name, {}))(model, x, y, p=p)
    ratio = got / closed_form(model, x, y, 2.0 if p == 2 else 1.0)
    assert ratio.min() >= 1 - 1e-4  # an upper bound: never below the true margin
    assert ratio.median() <= 1 + ATTACKS[name]
    assert ratio.max() <= 1.2


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_measure_the_distance_into_the_true_class_for_misclassified_points(name) -> None:
    model, x, y = linear_problem(k=2, n=12, seed=1)
    y = 1 - y  # all misclassified; with two classes the closed form is exact for them too
    got = build_estimator(name, **PARAMS.get(name, {}))(model, x, y)
    ratio = got / closed_form(model, x, y, 2.0)
    assert (got < 0).all()
    assert ratio.min() >= 1 - 1e-4 and ratio.median() <= 1 + ATTACKS[name]


def test_best_is_the_per_point_tightest_attack(linear4) -> None:
    model, x, y = linear4
    out = margin_values(model, x, y, ["deepfool", "fmn", "best", "lipschitz"])
    assert list(out) == ["deepfool", "fmn", "best", "lipschitz"]
    torch.testing.assert_close(out["best"], torch.minimum(out["deepfool"], out["fmn"]))
    alone = margin_values(model, x, y, ["best"], params={"best": {"attacks": ["deepfool"]}})
    torch.testing.assert_close(alone["best"], out["deepfool"])


def test_default_best_is_ddn_and_fmn_and_within_one_percent_of_the_closed_form(linear4) -> None:
    """The default ``best`` (DDN and FMN, chosen with benchmarks/bench_bounds.py) on its own and through
    estimate_margins: the per-point minimum of the two attacks, and tight against the closed form."""
    model, x, y = linear4
    alone = build_estimator("best")(model, x, y)
    out = margin_values(model, x, y, ["best"])
    parts = margin_values(model, x, y, ["ddn", "fmn"])
    torch.testing.assert_close(out["best"], torch.minimum(parts["ddn"], parts["fmn"]))
    torch.testing.assert_close(alone, out["best"])
    ratio = out["best"] / closed_form(model, x, y, 2.0)
    assert ratio.min() >= 1 - 1e-4 and ratio.median() <= 1.01


def test_kinds_and_registry() -> None:
    kinds = {name: ESTIMATORS.get(name).kind for name in ESTIMATORS.names()}
    assert kinds == {
        "exact-linear": MarginKind.EXACT,
        "first-order": MarginKind.ESTIMATE,
        "sampling": MarginKind.ESTIMATE,
        "lipschitz": MarginKind.LOWER,
        "deepfool": MarginKind.UPPER,
        "ddn": MarginKind.UPPER,
        "fmn": MarginKind.UPPER,
        "fab": MarginKind.UPPER,
        "best": MarginKind.UPPER,
        "crown": MarginKind.LOWER,
        "mip": MarginKind.EXACT,
    }
    assert MarginKind("lower bound") is MarginKind.LOWER and MarginKind.UPPER == "upper bound"


def test_batching_train_mode_and_gradients_are_left_alone(linear4) -> None:
    model, x, y = linear4
    mlp = build_model("mlp", input_shape=SHAPE, num_classes=4, widths=(16,)).train()
    whole = build_estimator("first-order", batch_size=100)(mlp, x, y)
    split = build_estimator("first-order", batch_size=5)(mlp, x, y)
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-6)
    mlp.phi[1].eval()  # a mixed train/eval state must survive as it is
    modes = [m.training for m in mlp.modules()]
    build_estimator("fab", n_iter=5)(mlp, x[:4], y[:4])
    assert [m.training for m in mlp.modules()] == modes
    assert all(p.requires_grad and p.grad is None for p in mlp.parameters())
    rng = torch.get_rng_state()
    build_estimator("fab", n_iter=2)(mlp, x[:2], y[:2])
    assert torch.equal(rng, torch.get_rng_state())  # FAB reseeds the global RNG: it must be restored


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, x, y: build_estimator("nope"), "unknown estimator"),
        (lambda m, x, y: build_estimator("sampling", radiu=2), "no parameter 'radiu'"),
        (lambda m, x, y: build_estimator("sampling", radius=-1), "radius"),
        (lambda m, x, y: build_estimator("first-order", batch_size=0), "batch_size"),
        (lambda m, x, y: build_estimator("first-order")(m, x, y, p=1), "unsupported norm"),
        (lambda m, x, y: build_estimator("ddn")(m, x, y, p="inf"), "does not support"),
        (lambda m, x, y: build_estimator("first-order")(m, x[:, 0], y), r"\[N,C,H,W\]"),
        (lambda m, x, y: build_estimator("first-order")(m, x, y[:-1]), "labels"),
        (lambda m, x, y: build_estimator("first-order")(m, x, y + 10), r"labels must lie in \[0, 3\]"),
        (lambda m, x, y: build_estimator("deepfool")(m, x * 3, y), r"inputs in \[0, 1\]"),
        (lambda m, x, y: margin_values(m, x, y, ["first-order"], params={"ddn": {}}), "not among"),
        (
            lambda m, x, y: margin_values(m, x, y, ["best"], params={"best": {"attacks": ["lipschitz"]}}),
            "attacks",
        ),
    ],
)
def test_user_mistakes_raise_config_errors(linear4, call, match) -> None:
    model, x, y = linear4
    with pytest.raises(ConfigError, match=match):
        call(model, x, y)


def test_exact_linear_refuses_deep_models(linear4) -> None:
    _, x, y = linear4
    mlp = build_model("mlp", input_shape=SHAPE, num_classes=4, widths=(8,))
    with pytest.raises(ConfigError, match="exact-linear needs a linear model"):
        build_estimator("exact-linear")(mlp, x, y)
    seq = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 4))
    assert build_estimator("exact-linear")(seq, x, y).shape == (len(x),)
    assert build_estimator("first-order")(seq, x[:0], y[:0]).shape == (0,)


def test_default_best_has_an_linf_mode() -> None:
    """DDN has no L∞ mode: the default ``best`` then combines FMN and DeepFool (both upper bounds)."""
    from conftest import margin_values

    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 4, 4), num_classes=3, widths=(8,)).eval()
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,))
    out = margin_values(model, x, y, ["fmn", "deepfool", "best"], p="inf")
    tight = torch.where(out["fmn"].abs() < out["deepfool"].abs(), out["fmn"], out["deepfool"])
    assert torch.equal(out["best"], tight)
    alone = margin_values(model, x, y, ["best"], p="inf")["best"]
    assert torch.equal(alone, tight)
