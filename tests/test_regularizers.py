"""Regularizers: hand-computed values, exact zero gradients outside [0, γ], the smaller-Gram identity, the
probe estimator's bias and variance against theory, recipes and config validation."""

import math

import pytest
import torch
from torch import nn

from marginlab.base.config import from_dict
from marginlab.base.errors import ConfigError
from marginlab.nets.models import build_model
from marginlab.training.recipes import (
    RegularizerConfig,
    build_regularizers,
    reference_gamma,
    reference_lr,
    resolve_config,
)
from marginlab.training.regularizers import (
    AverageMargin,
    Orthogonality,
    logit_margins,
    orthogonality_penalty,
)

# A 2-feature, 3-class head: z = W φ + b.
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
B = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
PHI = torch.tensor([[2.0, 1.0], [0.0, 3.0], [10.0, 0.0]], dtype=torch.float64)
Y = torch.tensor([0, 0, 0])
# By hand: z = [2, 1.5, -3], [0, 3.5, -3], [10, .5, -10] -> margins min_k(z_0 - z_k) = 0.5, -3.5, 9.5.


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.phi = nn.Identity()
        self.head = nn.Linear(2, 3).double()
        with torch.no_grad():
            self.head.weight.copy_(W)
            self.head.bias.copy_(B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.phi(x))


def test_logit_margins_match_hand_computation() -> None:
    logits = PHI @ W.T + B
    assert torch.allclose(logit_margins(logits, Y), torch.tensor([0.5, -3.5, 9.5], dtype=torch.float64))
    # normalised: gaps divided by ||w_0 - w_1|| = sqrt(2) and ||w_0 - w_2|| = sqrt(5)
    want = [
        min(0.5 / math.sqrt(2), 5 / math.sqrt(5)),
        min(-3.5 / math.sqrt(2), 3 / math.sqrt(5)),
        9.5 / math.sqrt(2),
    ]
    assert torch.allclose(logit_margins(logits, Y, W), torch.tensor(want, dtype=torch.float64))


def test_average_margin_value_and_gradient_zero_outside_clip() -> None:
    model = Tiny()
    feats = PHI.clone()
    logits = model.head(feats)
    logits.retain_grad()
    reg = AverageMargin(lam=0.1, gamma=5.0)
    value = reg(model, feats, logits, Y)
    # clip(0.5) + clip(-3.5) + clip(9.5) = 0.5 + 0 + 5
    assert value.item() == pytest.approx(-0.1 * 5.5 / 3, rel=1e-12)
    value.backward()
    g = logits.grad
    assert g is not None
    # sample 0 is inside [0, γ]: d/dz_y = -λ/B, d/dz_1 = +λ/B (class 1 attains the min); the others exactly 0
    assert torch.equal(g[0], torch.tensor([-0.1 / 3, 0.1 / 3, 0.0], dtype=torch.float64))
    assert torch.equal(g[1:], torch.zeros(2, 3, dtype=torch.float64))


def test_average_margin_gives_no_parameter_gradient_outside_clip() -> None:
    model = Tiny()
    feats = PHI[1:].clone().requires_grad_(True)  # margins -3.5 and 9.5: both outside [0, 5]
    for normalized in (False, True):
        model.zero_grad()
        logits = model.head(feats)
        AverageMargin(0.1, 5.0, normalized)(model, feats, logits, Y[1:]).backward()
        assert torch.count_nonzero(model.head.weight.grad) == 0
        assert torch.count_nonzero(model.head.bias.grad) == 0


def test_normalized_margin_value_and_finite_gradient() -> None:
    model = Tiny()
    logits = model.head(PHI)
    value = AverageMargin(1.0, 100.0, normalized=True)(model, PHI, logits, Y)
    assert value.item() == pytest.approx(-(0.5 / math.sqrt(2) + 0 + 9.5 / math.sqrt(2)) / 3, rel=1e-12)
    value.backward()
    assert torch.isfinite(model.head.weight.grad).all()


def direct_penalty(w: torch.Tensor) -> torch.Tensor:
    w = w.flatten(1)
    return (w @ w.T - torch.eye(w.shape[0], dtype=w.dtype)).pow(2).sum()


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (5, 5), (16, 2, 3, 3), (4, 9, 3, 3), (1, 1)])
def test_smaller_gram_equals_direct_formula(shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert orthogonality_penalty(w).item() == pytest.approx(direct_penalty(w).item(), rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))  # orthonormal columns: WᵀW = I_4
    assert orthogonality_penalty(q.T).item() == pytest.approx(0.0, abs=1e-12)  # W Wᵀ = I exactly
    assert orthogonality_penalty(q).item() == pytest.approx(2.0, abs=1e-12)  # (m - n) = 2 left over


@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (5, 5), (16, 2, 3, 3), (1, 1)])
def test_closed_form_gradient_equals_autograd_of_the_direct_formula(shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w1 = w.clone().requires_grad_(True)
    w2 = w.clone().requires_grad_(True)
    (3.0 * orthogonality_penalty(w1)).backward()  # the closed form 4 (WWᵀ − I) W, scaled by the outer 3
    (3.0 * direct_penalty(w2)).backward()  # autograd through the full m x m Gram
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)
    wide = w.flatten(1)
    want = 4 * (wide @ wide.T - torch.eye(wide.shape[0], dtype=torch.float64)) @ wide
    assert torch.allclose(w2.grad.flatten(1), 3.0 * want, rtol=1e-12, atol=1e-12)


def test_default_penalty_is_an_unbiased_estimate_of_the_exact_one() -> None:
    """The default's value and gradient, averaged over many steps, equal β Σ‖WWᵀ − I‖² and its gradient."""
    torch.manual_seed(0)
    model = build_model("mnist-mlp", widths=(24,)).double()
    (default,) = build_regularizers(RegularizerConfig(recipe="constraint"))
    exact = Orthogonality(beta=default.beta)
    params = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    x, y = torch.zeros(1, 1, 28, 28, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    logits = model(x).detach()
    want = exact(model, x, logits, y)
    g_want = torch.autograd.grad(want, params)
    calls = 3000 - 3000 % default.every  # whole cycles of `every`
    values, grads = [], [torch.zeros_like(p) for p in params]
    for _ in range(calls):
        v = default(model, x, logits, y)
        values.append(v.item())
        if v.requires_grad:
            for acc, g in zip(grads, torch.autograd.grad(v, params), strict=True):
                acc += g / calls
    d = torch.tensor(values, dtype=torch.float64)
    se = d.std().item() / math.sqrt(calls)
    assert abs(d.mean().item() - want.item()) < max(4 * se, 1e-9 * want.item())
    for g, gw in zip(grads, g_want, strict=True):
        assert (g - gw).norm() / gw.norm() < 0.05
    # and the exact penalty stays selectable: every=1, probes=0 is the exact value on every step
    (chosen,) = build_regularizers(RegularizerConfig(recipe="constraint", ortho_every=1, ortho_probes=0))
    assert chosen(model, x, logits, y).item() == pytest.approx(want.item(), rel=1e-12)


def test_orthogonality_layers_head_included_by_default() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 12, 12), num_classes=3, channels=(2, 3), fc=(5,))
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert len(weights) == 4  # conv, conv, fc, head
    x = torch.zeros(1, 1, 12, 12)
    y = torch.zeros(1, dtype=torch.long)
    want = sum(direct_penalty(w) for w in weights)
    got = Orthogonality(beta=0.5)(model, x, model(x), y)
    assert got.item() == pytest.approx(0.5 * want.item(), rel=1e-5)
    hidden = Orthogonality(beta=1.0, layers="hidden").penalty(model)
    assert hidden.item() == pytest.approx((want - direct_penalty(model.head.weight)).item(), rel=1e-5)
    named = Orthogonality(beta=1.0, layers="head").penalty(model)
    assert named.item() == pytest.approx(direct_penalty(model.head.weight).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="no weighted layer 'nope'"):
        Orthogonality(beta=1.0, layers="head,nope").penalty(model)


def test_probe_estimate_is_unbiased_with_theoretical_variance() -> None:
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(12, 5, generator=gen, dtype=torch.float64) / 3).requires_grad_(True)
    exact = orthogonality_penalty(w)
    (g_exact,) = torch.autograd.grad(exact, w)
    a = w.detach().T @ w.detach() - torch.eye(5, dtype=torch.float64)  # the smaller Gram minus I
    var_theory = 2 * (a @ a).pow(2).sum().item()  # Var(vᵀA²v) = 2 tr(A⁴) for v ~ N(0, I)
    draws, grads = [], []
    for _ in range(4000):
        est = orthogonality_penalty(w, probes=1, generator=gen)
        grads.append(torch.autograd.grad(est, w)[0])
        draws.append(est.item())
    d = torch.tensor(draws, dtype=torch.float64)
    se = math.sqrt(var_theory / len(draws))
    assert abs(d.mean().item() - exact.item()) < 4 * se  # unbiased value
    assert d.var().item() == pytest.approx(var_theory, rel=0.15)
    g_mean = torch.stack(grads).mean(0)
    assert (g_mean - g_exact).norm() / g_exact.norm() < 0.1  # unbiased gradient
    # averaging p probes divides the variance by p
    many = torch.tensor([orthogonality_penalty(w, probes=16, generator=gen).item() for _ in range(500)])
    assert many.var().item() == pytest.approx(var_theory / 16, rel=0.25)


def test_every_k_applies_k_times_the_gradient_once_per_k_steps_and_keeps_the_value() -> None:
    model = Tiny()
    reg = Orthogonality(beta=0.1, every=3)
    z = torch.zeros(1, 3, dtype=torch.float64)
    full = 0.1 * direct_penalty(W).item()
    (g_full,) = torch.autograd.grad(0.1 * direct_penalty(model.head.weight), model.head.weight)
    values, grads = [], []
    for _ in range(6):
        v = reg(model, PHI, z, Y)
        values.append(v.item())
        grads.append(torch.autograd.grad(v, model.head.weight)[0] if v.requires_grad else None)
    # the value (what the loop logs) is β·penalty on every step; the gradient is k times it every k-th step
    assert values == pytest.approx([full] * 6, rel=1e-12)
    assert [g is None for g in grads] == [False, True, True, False, True, True]
    assert torch.allclose(grads[0], 3 * g_full, rtol=1e-12) and torch.allclose(
        grads[3], 3 * g_full, rtol=1e-12
    )


def test_state_dict_resumes_step_counter_and_probe_stream() -> None:
    model = Tiny()
    z = torch.zeros(1, 3, dtype=torch.float64)
    a = Orthogonality(beta=1.0, every=2, probes=3, seed=5)
    a(model, PHI, z, Y)
    state = a.state_dict()
    want = [a(model, PHI, z, Y) for _ in range(3)]
    b = Orthogonality(beta=1.0, every=2, probes=3, seed=5)
    b.load_state_dict(state)
    got = [b(model, PHI, z, Y) for _ in range(3)]
    assert [v.item() for v in got] == [v.item() for v in want]
    # resumed on a skipped step (the value carried over, no gradient), then the next applied one
    assert [v.requires_grad for v in got] == [False, True, False]
    assert got[0].item() > 0 and got[0].dtype == torch.float64


def test_recipes_build_the_reference_terms() -> None:
    assert build_regularizers(RegularizerConfig()) == []
    (ortho,) = build_regularizers(RegularizerConfig(recipe="constraint"))
    assert isinstance(ortho, Orthogonality) and ortho.beta == 1e-3
    margin, ortho = build_regularizers(RegularizerConfig(recipe="regularized"), model_name="mnist-cnn")
    assert isinstance(margin, AverageMargin) and (margin.lam, margin.gamma) == (0.1, 40.0)
    assert isinstance(ortho, Orthogonality) and ortho.beta == 1e-3
    cfg = resolve_config(RegularizerConfig(recipe="regularized", gamma=7.0, lam=0.5), "mnist-cnn")
    assert (cfg.lam, cfg.gamma, cfg.beta) == (0.5, 7.0, 1e-3)
    names = ("mnist-lr", "mnist-mlp", "mnist-cnn", "cifar-mlp", "cifar-cnn")
    assert [reference_gamma(n) for n in names] == [5, 5, 40, 10, 10]
    assert reference_gamma("cnn", "fashion-mnist:0,1") == 40.0
    assert (reference_lr("standard"), reference_lr("constraint"), reference_lr("regularized")) == (
        0.01,
        0.01,
        0.002,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recipe": "regularized", "lam": -1.0}, "lam must be a finite number >= 0"),
        ({"recipe": "regularized", "gamma": float("nan")}, "gamma must be a finite number"),
        ({"recipe": "constraint", "beta": float("inf")}, "beta must be a finite number"),
        ({"recipe": "regularized", "gamma": 0.0}, "gamma must be > 0"),
        ({"recipe": "standard", "beta": 1e-3}, "recipe 'standard' has no orthogonality term"),
        ({"recipe": "constraint", "lam": 0.1}, "has no average-margin term"),
        ({"recipe": "fancy"}, "unknown regularizer recipe 'fancy'"),
        ({"recipe": "constraint", "ortho_every": 0}, "ortho_every must be >= 1"),
    ],
)
def test_config_validation_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        RegularizerConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_missing_gamma_and_unknown_model_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="needs gamma"):
        build_regularizers(RegularizerConfig(recipe="regularized"))
    with pytest.raises(ConfigError, match="no reference gamma for model 'mlp'"):
        build_regularizers(RegularizerConfig(recipe="regularized"), model_name="mlp", dataset="digits")
    cfg = from_dict(RegularizerConfig, {"recipe": "regularized", "gamma": 5, "ortho_probes": 4})
    assert cfg.gamma == 5.0 and cfg.ortho_probes == 4


@pytest.mark.parametrize("every", [1, 50])
def test_training_step_with_the_regularized_recipe(every: int) -> None:
    """The gradient of a training step's loss (mean cross-entropy + average margin + probed orthogonality)
    against central finite differences in float64 at sampled coordinates of every parameter. Each loss
    evaluation builds the regularizers afresh (step 0, the same probes). With ``ortho_every = k`` the
    applied step's orthogonality gradient is k times its finite difference (documented), so the check is
    ``grad = fd(cross-entropy + margin) + k * fd(orthogonality)``."""
    torch.manual_seed(0)
    model = build_model("mnist-mlp", widths=(32,)).double()
    cfg = RegularizerConfig(recipe="regularized", ortho_probes=2, ortho_every=every)
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[4:] = (y[4:] + 1) % 10  # four points correct (margins in (0, γ)), four misclassified

    def terms() -> tuple[torch.Tensor, torch.Tensor]:
        margin, ortho = build_regularizers(cfg, model_name="mnist-mlp")
        assert isinstance(margin, AverageMargin) and isinstance(ortho, Orthogonality)
        feats = model.phi(x)
        logits = model.head(feats)
        main = nn.functional.cross_entropy(logits, y) + margin(model, feats, logits, y)
        return main, ortho(model, feats, logits, y)

    gamma = resolve_config(cfg, model_name="mnist-mlp").gamma
    with torch.no_grad():
        margins = logit_margins(model(x), y)
    assert ((margins > 1e-3) & (margins < gamma - 1e-3)).sum() == 4  # the margin term has a gradient
    main, ortho = terms()
    (main + ortho).backward()
    gen = torch.Generator().manual_seed(1)
    h = 1e-6
    for name, param in model.named_parameters():
        flat, grad = param.data.view(-1), param.grad.view(-1)
        for i in torch.randperm(flat.numel(), generator=gen)[:6].tolist():
            value = flat[i].item()
            diffs = []
            for sign in (1.0, -1.0):
                flat[i] = value + sign * h
                with torch.no_grad():
                    diffs.append(torch.stack(terms()))
            flat[i] = value
            fd_main, fd_ortho = ((diffs[0] - diffs[1]) / (2 * h)).tolist()
            want = fd_main + every * fd_ortho
            assert grad[i].item() == pytest.approx(want, rel=1e-5, abs=1e-8), (name, i)
