"""Certified training (``ibp``, ``crown-ibp``): the differentiable bounds of ``training/ibp.py`` against
the closed-form margin of a linear model, the exact minimum of a locally affine net, marginlab's own
float64 bound propagation (``bounds/crown.py`` with interval intermediate bounds), random and PGD points
inside the ball and the box; the objectives' schedules, gradients and parameter checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.crown import layer_bounds, margin_spec, spec_rows
from marginlab.bounds.domain import InputSet
from marginlab.bounds.network import network_graph
from marginlab.core.norms import Norm
from marginlab.nets.models import MarginNet, build_model
from marginlab.training.certified import CrownIbp, Ibp, reference_eps_train
from marginlab.training.ibp import (
    TrainingBall,
    chain_layers,
    crown_ibp_margin_lower,
    ibp_margin_lower,
    interval_bounds,
)
from marginlab.training.objectives import OBJECTIVES, BuildContext, StepInfo

SHAPE, K = (1, 10, 10), 5
SETS = [(math.inf, True), (math.inf, False), (2.0, True), (2.0, False)]


def _wrap(model: nn.Module) -> nn.Module:
    """``net(x) -> (features, logits)`` as the training loop's wrapper."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            assert isinstance(self.model, MarginNet)
            feats = self.model.phi(x)
            return feats, self.model.head(feats)

    return Net()


def _models(seed: int = 0) -> dict[str, MarginNet]:
    torch.manual_seed(seed)
    return {
        "mlp": build_model("mlp", input_shape=SHAPE, num_classes=K, widths=(24, 16)),
        "cnn": build_model("cnn", input_shape=SHAPE, num_classes=K, channels=(4, 4), fc=(12,)),
    }


def _data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    x[:, :, :3] = 0.0  # pixels at the box's faces, as in MNIST
    # labels a fixed linear teacher gives: learnable, so brief training shapes the net
    teacher = torch.randn(K, x[0].numel(), generator=torch.Generator().manual_seed(7))
    return x, (x.flatten(1) @ teacher.T).argmax(1)


def _bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, p: float, box: bool):
    layers = chain_layers(model)
    ball = TrainingBall(x, eps, p, box)
    boxes = interval_bounds(layers, ball)
    return (
        layers,
        ball,
        boxes,
        ibp_margin_lower(layers, boxes, ball, y),
        crown_ibp_margin_lower(layers, boxes, ball, y),
    )


def _gaps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B,K-1]``: ``f_y - f_k`` for ``k != y`` in order."""
    logits = model(x)
    keep = ~torch.eye(K, dtype=torch.bool)[y]
    return (logits.gather(1, y[:, None]) - logits)[keep].reshape(len(y), K - 1)


def _project(x0: torch.Tensor, x: torch.Tensor, eps: float, p: float, box: bool) -> torch.Tensor:
    """Into the ball, then the box (clipping to the box only moves a point closer to ``x0`` in it)."""
    d = x - x0
    if p == math.inf:
        d = d.clamp(-eps, eps)
    else:
        norm = d.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
        d = d * torch.clamp(eps / norm, max=1.0)
    return (x0 + d).clamp(0, 1) if box else x0 + d


def _pgd_gaps(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, p: float, box: bool
) -> torch.Tensor:
    """The smallest ``f_y - f_k`` per ``k`` in 30 signed / normalised gradient steps from a random start."""
    best = torch.full((len(y), K - 1), math.inf)
    g = torch.Generator().manual_seed(3)
    for k in range(K - 1):
        x = _project(x0, x0 + eps * (2 * torch.rand(x0.shape, generator=g) - 1), eps, p, box)
        for _ in range(30):
            x.requires_grad_(True)
            gap = _gaps(model, x, y)[:, k]
            (grad,) = torch.autograd.grad(gap.sum(), x)
            with torch.no_grad():
                best[:, k] = torch.minimum(best[:, k], gap)
                if p == math.inf:
                    step = grad.sign()
                else:
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
                x = _project(x0, x - eps / 8 * step, eps, p, box)
        with torch.no_grad():
            best[:, k] = torch.minimum(best[:, k], _gaps(model, x, y)[:, k])
    return best


def _train_briefly(model: MarginNet, objective_name: str) -> MarginNet:
    """20 Adam steps of a certified objective (kappa 0.5 throughout), so the bounds are those of a
    net shaped by certified training, not only of a random one."""
    ctx = BuildContext(dataset="digits")
    cls = OBJECTIVES.get(objective_name)
    params = cls.resolve_params(
        {"eps": 0.05, "warmup": 0.0, "ramp": 0.0, "kappa_start": 0.5, "kappa_final": 0.5}, ctx
    )
    objective, net = cls.build(params, ctx), _wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = _data(32, seed=5)
    for step in range(20):
        loss = objective(net, model, x, y, StepInfo(0, step, 20, 1)).objective
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize(("p", "box"), SETS)
def test_bounds_below_random_and_pgd_points(p: float, box: bool) -> None:
    x, y = _data()
    eps = 0.08 if p == math.inf else 0.5
    models = _models()
    trained = {
        f"{k}-trained": _train_briefly(_models(1)[k], "crown-ibp" if k == "cnn" else "ibp") for k in models
    }
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    linear = build_model("lr", input_shape=SHAPE, num_classes=K)
    for name, model in {**models, **trained, "lr": linear}.items():
        with torch.no_grad():
            *_, ilb, clb = _bounds(model, x, y, eps, p, box)
            points = [
                _project(x, x + eps * (2 * torch.rand(x.shape, generator=g) - 1), eps, p, box)
                for _ in range(16)
            ]
            low = torch.stack([_gaps(model, z, y) for z in points]).amin(0)
        low = torch.minimum(low, _pgd_gaps(model, x, y, eps, p, box))
        assert (ilb <= low + 1e-5).all(), name
        assert (clb <= low + 1e-5).all(), name
        assert (clb > -1e3).all()  # not vacuous by overflow


@pytest.mark.parametrize(("p", "box"), SETS)
def test_agrees_with_float64_bound_propagation(p: float, box: bool) -> None:
    """Intermediate bounds = ``layer_bounds(intermediate="ibp")``; CROWN-IBP = its ``spec_rows`` over the
    same set (the L2 ball in the box: marginlab adds a Lagrangian dual bound, so ours may be lower)."""
    x, y = _data()
    eps = 0.05 if p == math.inf else 0.4
    for name, model in _models().items():
        with torch.no_grad():
            layers, ball, boxes, ilb, clb = _bounds(model, x, y, eps, p, box)
        graph = network_graph(model, SHAPE)
        inset = InputSet(x.double().flatten(1), torch.full((len(x),), eps, dtype=torch.float64), p, box)
        ref = layer_bounds(graph, inset, intermediate="ibp")
        assert ref, name
        for k, (lo, hi) in ref.items():
            assert torch.allclose(boxes[k][0].double(), lo, atol=1e-5), (name, k)
            assert torch.allclose(boxes[k][1].double(), hi, atol=1e-5), (name, k)
        a, d = spec_rows(graph, ref, margin_spec(y, K, torch.ones(len(y))))
        want = inset.concretize(a) + d
        if p == 2.0 and box:
            assert (clb.double() <= want + 1e-5).all(), name
        else:
            assert torch.allclose(clb.double(), want, atol=1e-5), name
        # IBP with the last layer folded, in float64 from the reference's interval of the last hidden layer
        last = len(graph) - 1
        lo, hi = (t.clamp(min=0) for t in ref[last - 1]) if last - 1 in ref else ref[last]
        head = model.head
        c = margin_spec(y, K, torch.ones(len(y)))
        w, b = c @ head.weight.double(), c @ head.bias.double()
        fold = (w @ ((lo + hi) / 2)[..., None])[..., 0] + b - (w.abs() @ ((hi - lo) / 2)[..., None])[..., 0]
        assert torch.allclose(ilb.double(), fold, atol=1e-5), name


@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_linear_model_bounds_are_the_exact_minimum(p: float) -> None:
    """Linear model in R^d: ``min f_y - f_k = gap(x0) - eps ||w_y - w_k||_q`` (q dual to p), both methods."""
    torch.manual_seed(0)
    model = build_model("lr", input_shape=SHAPE, num_classes=K)
    x, y = _data()
    eps = 0.05 if p == math.inf else 0.5
    with torch.no_grad():
        *_, ilb, clb = _bounds(model, x, y, eps, p, box=False)
        w = model.head.weight
        keep = ~torch.eye(K, dtype=torch.bool)[y]
        rows = (w[y][:, None, :] - w[None])[keep].reshape(len(y), K - 1, -1)
        want = _gaps(model, x, y) - eps * rows.norm(p=1 if p == math.inf else 2, dim=2)
    assert torch.allclose(ilb, want, atol=1e-5)
    assert torch.allclose(clb, want, atol=1e-5)


def test_crown_ibp_exact_where_every_relu_is_stable() -> None:
    """A radius so small that every ReLU is stable: the net is affine on the box, so CROWN-IBP is the
    exact minimum of ``gap(x0) + J (x - x0)`` over it (J by autograd), and IBP cannot beat it."""
    model = _models()["mlp"]
    x, y = _data()
    eps = 2e-4
    with torch.no_grad():
        layers, _, boxes, ilb, clb = _bounds(model, x, y, eps, math.inf, True)
    stable = torch.ones(len(x), dtype=torch.bool)
    for layer, (lo, hi) in zip(layers, boxes, strict=True):
        if isinstance(layer, nn.ReLU):
            stable &= ((lo >= 0) | (hi <= 0)).flatten(1).all(1)
    assert stable.sum() >= len(x) // 2  # the points to check
    want = torch.zeros(len(y), K - 1)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    for k in range(K - 1):
        x0 = x.clone().requires_grad_(True)
        gap = _gaps(model, x0, y)[:, k]
        (jac,) = torch.autograd.grad(gap.sum(), x0)
        with torch.no_grad():
            want[:, k] = gap + (jac.clamp(min=0) * (lo - x) + jac.clamp(max=0) * (hi - x)).flatten(1).sum(1)
    assert torch.allclose(clb[stable], want[stable], atol=1e-5)
    assert (clb[stable] >= ilb[stable] - 1e-6).all()
    assert (clb[stable] > ilb[stable] + 1e-6).any()  # and IBP is looser there


@pytest.mark.parametrize("name", ["ibp", "crown-ibp"])
def test_gradients_reach_every_weight(name: str) -> None:
    ctx = BuildContext(dataset="digits")
    cls = OBJECTIVES.get(name)
    params = cls.resolve_params({"eps": 0.1, "warmup": 0.0, "ramp": 0.5}, ctx)
    objective = cls.build(params, ctx)
    x, y = _data()
    for model in _models().values():
        out = objective(_wrap(model), model, x, y, StepInfo(0, 5, 10, 1))  # mid-ramp: every part weighs
        assert out.terms["verified-ce"] > 0
        out.objective.backward()
        for pname, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
            assert param.grad.abs().sum() > 0, pname


def test_schedules_at_given_steps() -> None:
    ctx = BuildContext(dataset="mnist")
    ibp = Ibp.build(Ibp.resolve_params({}, ctx), ctx)
    crown = CrownIbp.build(CrownIbp.resolve_params({}, ctx), ctx)
    at = lambda step: StepInfo(0, step, 600, 1)  # noqa: E731  (a 600-step run)
    # ibp: warm-up 600/30 = 20 steps, ramp 600/6 = 100 steps, eps_train 0.4, kappa 1 -> 0.5
    assert ibp.schedule.at(at(10)) == (0.0, 1.0, 0.0)
    assert ibp.schedule.at(at(70)) == pytest.approx((0.2, 0.75, 0.0))
    assert ibp.schedule.at(at(300)) == pytest.approx((0.4, 0.5, 0.0))
    # crown-ibp: warm-up 30 steps, ramp 150 steps, kappa 1 -> 0, beta 1 -> 0
    assert crown.schedule.at(at(29)) == (0.0, 1.0, 1.0)
    assert crown.schedule.at(at(30 + 150 // 5)) == pytest.approx((0.08, 0.8, 0.8))
    assert crown.schedule.at(at(599)) == pytest.approx((0.4, 0.0, 0.0))


@pytest.mark.parametrize("name", ["ibp", "crown-ibp"])
def test_zero_radius_loss_is_the_cross_entropy(name: str) -> None:
    """At eps = 0 the bounds are the logit gaps themselves, and CE is invariant to a shift of all logits."""
    ctx = BuildContext(dataset="digits")
    cls = OBJECTIVES.get(name)
    params = cls.resolve_params(
        {"eps": 0.1, "eps_train": 0.0, "warmup": 0.0, "ramp": 0.0, "kappa_start": 0.3, "kappa_final": 0.3},
        ctx,
    )
    objective = cls.build(params, ctx)
    x, y = _data()
    for model in _models().values():
        out = objective(_wrap(model), model, x, y, StepInfo(0, 0, 10, 1))
        assert out.objective.item() == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-5)
        assert out.ce.item() == pytest.approx(out.objective.item(), abs=1e-5)


def test_reference_params_and_errors() -> None:
    ctx = BuildContext(dataset="mnist")
    got = CrownIbp.resolve_params({}, ctx)
    assert got["eps"] == 0.3 and got["eps_train"] == 0.4 and got["norm"] == "Linf"
    assert (got["warmup"], got["ramp"], got["kappa_final"], got["beta_final"]) == (0.05, 0.25, 0.0, 0.0)
    assert Ibp.resolve_params({}, ctx)["kappa_final"] == 0.5
    # both papers' MNIST L-inf table: 0.1 -> 0.2, 0.2 / 0.3 / 0.4 -> 0.4; CIFAR-10 1.1x; L2: eps itself
    assert [reference_eps_train(e, "mnist", Norm.Linf) for e in (0.1, 0.2, 0.3, 0.4)] == [0.2, 0.4, 0.4, 0.4]
    assert reference_eps_train(8 / 255, "cifar10", Norm.Linf) == pytest.approx(8.8 / 255)
    assert reference_eps_train(1.5, "mnist", Norm.L2) == 1.5
    assert Ibp.resolve_params({"norm": "L2"}, ctx)["eps"] == 2.0
    with pytest.raises(ConfigError, match="set eps"):
        Ibp.resolve_params({}, BuildContext(dataset="digits"))
    with pytest.raises(ConfigError, match="no parameter"):
        Ibp.resolve_params({"beta_final": 0.0}, ctx)
    with pytest.raises(ConfigError, match="warmup"):
        CrownIbp.resolve_params({"warmup": 0.6, "ramp": 0.6}, ctx)
    with pytest.raises(ConfigError, match="kappa_final"):
        CrownIbp.resolve_params({"kappa_final": 2}, ctx)


def test_unsupported_layers_are_one_line_errors() -> None:
    bad = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="cannot bound layer Softplus at 2") as err:
        chain_layers(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="ending in an nn.Linear"):
        chain_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ConfigError, match="MaxPool2d"):
        chain_layers(nn.Sequential(nn.MaxPool2d(2, padding=1), nn.Flatten(), nn.Linear(4, 2)))
    # dropout is the identity in bounds
    assert len(chain_layers(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)))) == 2
