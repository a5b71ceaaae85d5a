"""The large-margin loss (training/large_margin.py) against closed forms: on a linear model the
first-order margin at the input is the exact margin (core/linear.py), so the loss is the hinge of exact
margins, clipped at gamma and at gamma (1 - alpha); at a MarginNet's features it is the exact margin of the
linear head; L2, L∞ (dual L1) and L1; both gradient modes give finite gradients."""

from __future__ import annotations

import pytest
import torch

from marginlab.base.errors import ConfigError
from marginlab.core.linear import linear_margins
from marginlab.nets.models import MarginNet, lr, mlp
from marginlab.training.large_margin import LargeMargin
from marginlab.training.loop import FeaturesAndLogits
from marginlab.training.objectives import BuildContext, StepInfo

AT = StepInfo(epoch=0, step=0, steps_per_epoch=1, epochs=1)
K = 10
EXACT = {"output": "logits", "top_k": K - 1, "aggregate": "min", "scale": "none", "eps": 0.0, "weight": 1.0}


def _loss(model: MarginNet, x: torch.Tensor, y: torch.Tensor, **params: object) -> torch.Tensor:
    obj = LargeMargin.build(LargeMargin.resolve_params(params, BuildContext()), BuildContext())
    return obj(FeaturesAndLogits(model), model, x, y, AT).terms["large_margin"]


def _linear(seed: int = 0) -> tuple[MarginNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = lr(input_shape=(1, 4, 5), num_classes=K)
    x = torch.rand(64, 1, 4, 5)
    return model, x, model(x).argmax(1)


@pytest.mark.parametrize("norm", ["L2", "Linf", "L1"])
@pytest.mark.parametrize("approximate", [True, False])
def test_linear_input_term_is_the_hinge_of_exact_margins(norm: str, approximate: bool) -> None:
    model, x, y = _linear()
    exact = linear_margins(model.head, None, x, y, p=norm)
    loss = _loss(model, x, y, norm=norm, gamma=100.0, layers="input", approximate=approximate, **EXACT)
    torch.testing.assert_close(loss.detach(), (100.0 - exact).mean(), rtol=1e-6, atol=1e-5)
    loss.backward()
    grad = model.head.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


@pytest.mark.parametrize("norm", ["L2", "Linf"])
def test_clipping_at_gamma_and_at_the_lower_bound(norm: str) -> None:
    model, x, y = _linear(1)
    y = y.clone()
    y[:10] = (y[:10] + 3) % K  # ten misclassified points: negative margins
    exact = linear_margins(model.head, None, x, y, p=norm)
    gamma = float(exact[10:].median())  # half the correct points lie beyond gamma: clipped to 0
    alpha = 1.05  # lower bound gamma (1 - alpha) = -0.05 gamma: the wrong points saturate there
    loss = _loss(model, x, y, norm=norm, gamma=gamma, alpha=alpha, layers="input", **EXACT)
    expected = torch.relu(gamma - exact.clamp(min=gamma * (1 - alpha))).mean()
    assert int((exact > gamma).sum()) >= 20 and int((exact < gamma * (1 - alpha)).sum()) > 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)


def test_sum_over_classes_and_layer_size_scale() -> None:
    """``aggregate="sum"``: the pairwise distances (w_y - w_k).x / ||w_y - w_k||_q summed over k;
    ``scale="size"`` (official in L∞) divides the dual norm by the layer's size D = 20."""
    model, x, y = _linear(2)
    w, b = model.head.weight.detach(), model.head.bias.detach()
    logits = x.flatten(1) @ w.T + b
    diff = logits.gather(1, y[:, None]) - logits  # [B,K]
    norms = (w[y][:, None, :] - w[None, :, :]).abs().sum(-1)  # L1 (dual of L∞) [B,K]
    pair = diff / norms.masked_fill(norms == 0, 1.0)
    expected = (1e4 - pair).masked_fill(torch.nn.functional.one_hot(y, K).bool(), 0.0).sum(1).mean()
    params = {**EXACT, "aggregate": "sum"}
    loss = _loss(model, x, y, norm="Linf", gamma=1e4, layers="input", **params)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-3)
    exact = linear_margins(model.head, None, x, y, p="Linf")
    sized = _loss(model, x, y, norm="Linf", gamma=1e4, layers="input", **{**EXACT, "scale": "size"})
    torch.testing.assert_close(sized.detach(), (1e4 - 20 * exact).mean(), rtol=1e-6, atol=1e-3)


def test_features_layer_is_the_exact_margin_of_the_head() -> None:
    torch.manual_seed(3)
    model = mlp(input_shape=(1, 4, 5), widths=(12,), num_classes=K)
    x = torch.rand(40, 1, 4, 5)
    y = model(x).argmax(1)
    with torch.no_grad():
        exact = linear_margins(model.head, None, model.features(x), y, p="L2")
    loss = _loss(model, x, y, norm="L2", gamma=50.0, layers="features", **EXACT)
    torch.testing.assert_close(loss.detach(), (50.0 - exact).mean(), rtol=1e-6, atol=1e-5)
    # input and hidden (the MLP's one activation, which is its features) average two layers' terms
    at_input = _loss(model, x, y, norm="L2", gamma=50.0, layers="input", **EXACT)
    both = _loss(model, x, y, norm="L2", gamma=50.0, layers="input,hidden", **EXACT)
    torch.testing.assert_close(both, (at_input + loss) / 2)


@pytest.mark.parametrize("approximate", [True, False])
def test_reference_settings_give_finite_gradients(approximate: bool) -> None:
    torch.manual_seed(4)
    model = mlp(input_shape=(1, 4, 5), widths=(16,), num_classes=K)
    x, y = torch.rand(32, 1, 4, 5), torch.randint(0, K, (32,))
    ctx = BuildContext(dataset="mnist")
    params = LargeMargin.resolve_params({"approximate": approximate}, ctx)
    assert (params["gamma"], params["alpha"], params["top_k"], params["norm"]) == (1e4, 4.0, 1, "Linf")
    assert params["weight"] == 0.02
    assert (params["layers"], params["output"], params["scale"], params["ce_weight"]) == (
        "input,hidden",
        "probs",
        "size",
        0.0,
    )
    out = LargeMargin.build(params, ctx)(FeaturesAndLogits(model), model, x, y, AT)
    out.objective.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert torch.equal(out.objective, out.terms["large_margin"])  # ce_weight 0: the margin loss alone
    assert float(out.objective.detach()) > 0.02 * 1e4 * 0.99  # gamma 1e4 is beyond every first-order distance


def test_bad_parameters_are_one_line_errors() -> None:
    l2 = LargeMargin.resolve_params({"norm": 2}, BuildContext())
    assert (l2["scale"], l2["weight"]) == ("none", 0.5)
    for params in (
        {"gama": 1.0},
        {"gamma": 0.0},
        {"alpha": -1.0},
        {"top_k": 0},
        {"layers": "input,conv"},
        {"output": "softmax"},
        {"aggregate": "mean"},
        {"approximate": "yes"},
        {"norm": "L3"},
        {"scale": "dim"},
    ):
        with pytest.raises(ConfigError) as err:
            LargeMargin.resolve_params(params, BuildContext())
        assert "\n" not in str(err.value)
