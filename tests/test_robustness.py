"""Robustness evaluation: on a linear model the exact margin is known in closed form, so robust accuracy at
ε must be the share of correct points with margin > ε; the sanity checks must fire on broken setups."""

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.base.fsio import to_jsonable
from marginlab.nets.models import build_model
from marginlab.plots.robustness import plot_robustness
from marginlab.robustness import RobustnessResult, robust_accuracy, robustness_curve
from marginlab.robustness.attacks import RobustnessSettings, _fit_to_problem
from marginlab.robustness.cascade import verify

EPS = [0.05, 0.1, 0.2]


SHAPE = (1, 5, 4)  # d = 20 inputs (L2 Square needs images >= 5 pixels high)


def linear_problem(n: int = 60, k: int = 3, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear model and points in [0.3, 0.7]^d: every perturbation of norm <= 0.2 stays inside [0, 1], so
    the box never binds and the closed-form margin is the exact robust radius."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model("lr", input_shape=SHAPE, num_classes=k)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(k, 20, generator=gen))
        model.head.bias.copy_(torch.randn(k, generator=gen))
    x = 0.3 + 0.4 * torch.rand(n, *SHAPE, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % k  # a few misclassified points
    return model.eval(), x, y


def exact_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dual: float) -> torch.Tensor:
    """min_{k≠y} (z_y − z_k) / ‖w_y − w_k‖_dual: signed distance to the boundary (dual norm)."""
    w, b = model.head.weight.detach(), model.head.bias.detach()
    z = x.flatten(1) @ w.T + b
    gaps = z.gather(1, y[:, None]) - z
    norms = torch.linalg.vector_norm(w[y][:, None, :] - w[None], ord=dual, dim=2)
    ratio = gaps / norms.clamp_min(1e-12)
    ratio[torch.arange(len(y)), y] = float("inf")
    return ratio.min(1).values


def assert_matches_margins(res: RobustnessResult, margins: torch.Tensor, tol: float = 0.03) -> None:
    for j, e in enumerate(res.eps):
        flags = torch.tensor(res.points["robust"][j])
        clear = (margins - e).abs() > tol * e  # points right at ε may go either way
        assert clear.sum() > 0.8 * len(margins)
        assert torch.equal(flags[clear], (margins > e)[clear]), f"eps={e}"


@pytest.mark.parametrize(("norm", "dual", "eps"), [("L2", 2.0, EPS), ("Linf", 1.0, [0.005, 0.01, 0.02])])
def test_pgd_robust_accuracy_equals_exact_linear_margins(norm: str, dual: float, eps: list[float]) -> None:
    model, x, y = linear_problem()
    margins = exact_margins(model, x, y, dual)
    res = robust_accuracy(
        model, x, y, eps, norm=norm, attacks=("pgd",), steps=50, step_size=eps[-1] / 10, certify="off"
    )
    assert res.clean_accuracy == pytest.approx(55 / 60)
    assert_matches_margins(res, margins)
    assert res.warnings == []
    # not vacuous: some points are broken and some survive at every ε
    assert all(0 < acc < res.clean_accuracy for acc in res.worst_case)


def test_autoattack_custom_equals_exact_linear_margins() -> None:
    model, x, y = linear_problem()
    res = robust_accuracy(
        model,
        x,
        y,
        EPS[1:],
        attacks=("autoattack",),
        aa_version="custom",
        aa_attacks=["apgd-ce"],
        aa_iters=20,
        certify="off",  # certificates would leave AutoAttack nothing to do on a linear model
    )
    assert_matches_margins(res, exact_margins(model, x, y, 2.0))


def test_default_stages_are_the_ddn_bound_then_autoattack_only() -> None:
    """The defaults chosen with benchmarks/bench_eval_speed.py: DDN pre-pass, then AutoAttack 'standard'
    (PGD only on request); here AutoAttack is cut to APGD-CE for speed, the stages are the defaults'."""
    s = RobustnessSettings()
    assert (s.certify, s.bound, s.attacks, s.aa_version) == ("auto", "ddn", ("autoattack",), "standard")
    model, x, y = linear_problem()
    res = robust_accuracy(model, x, y, EPS[1:], aa_version="custom", aa_attacks=["apgd-ce"], aa_iters=20)
    assert res.stages == ["bound", "autoattack"] and res.bound == {"estimator": "ddn", "kind": "upper bound"}
    assert res.certifier is not None and res.certifier["estimator"] == "crown" and res.certified is not None
    assert_matches_margins(res, exact_margins(model, x, y, 2.0))


def test_margin_bounds_skip_points_and_cap_accuracy() -> None:
    model, x, y = linear_problem()
    margins = exact_margins(model, x, y, 2.0)
    kw = {"attacks": ("pgd",), "steps": 50, "step_size": 0.01, "certify": "off"}
    full = robust_accuracy(model, x, y, EPS, bound=None, **kw)
    cheap = robust_accuracy(model, x, y, EPS, margin_upper=margins, **kw)
    assert cheap.stages == ["bound", "pgd"]
    want = [((margins > e) & torch.tensor(full.points["correct"])).float().mean().item() for e in EPS]
    assert cheap.bound_share == pytest.approx(want)
    assert all(a <= s + 1e-12 for a, s in zip(cheap.worst_case, cheap.bound_share, strict=True))
    assert cheap.worst_case == pytest.approx(full.worst_case, abs=2 / 60)
    # PGD ran only on the points the bound left robust; chaining shrinks the work at each larger ε
    assert cheap.attacked["pgd"] == [round(a * 60) for a in cheap.accuracy["bound"]]
    assert (
        sum(cheap.attacked["pgd"])
        < sum(full.attacked["pgd"])
        == 55 + sum(round(a * 60) for a in full.worst_case[:-1])
    )


def test_disagreement_check_fires_when_pgd_is_weak() -> None:
    model, x, y = linear_problem()
    res = robust_accuracy(
        model, x, y, [0.2], attacks=("pgd", "autoattack"), steps=1, step_size=1e-4, random_start=False,
        aa_version="custom", aa_attacks=["apgd-ce"], aa_iters=20, bound=None, certify="off",
    )  # fmt: skip
    assert res.accuracy["pgd"][0] > res.accuracy["autoattack"][0] + 0.02
    assert any(w.startswith("autoattack broke") and "pgd alone overstates" in w for w in res.warnings)


def test_proposals_outside_the_ball_or_box_or_still_correct_are_rejected() -> None:
    model, x, y = linear_problem(n=20)
    margins = exact_margins(model, x, y, 2.0)
    i = int(torch.nonzero(margins > 0.05)[0])
    w = model.head.weight.detach()
    z = model(x[i : i + 1]).detach()[0]
    k = int(
        torch.tensor(
            [(z[y[i]] - z[c]) / (w[y[i]] - w[c]).norm() if c != y[i] else 1e9 for c in range(3)]
        ).argmin()
    )
    step = (w[k] - w[y[i]]).reshape(SHAPE) / (w[k] - w[y[i]]).norm()  # the shortest way to class k
    s = RobustnessSettings(norm="L2")
    xi, yi = x[i : i + 1], y[i : i + 1]
    r = margins[i].item()
    ok, size = verify(model, xi, (xi + 1.01 * r * step).clamp(0, 1), yi, 1.02 * r, s)
    assert ok.item() and size.item() == pytest.approx(1.01 * r, rel=1e-5)
    assert not verify(model, xi, xi + 1.01 * r * step, yi, r, s)[0].item()  # just outside the ball
    assert not verify(model, xi, xi + 0.99 * r * step, yi, r, s)[0].item()  # inside, still correct
    outside_box = xi + 1.01 * r * step + 2.0 * (step > 0)
    assert not verify(model, xi, outside_box, yi, 100.0, s)[0].item()  # leaves [0, 1]


class Dropper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.drop = inner, nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.drop(x))


def test_train_mode_is_flagged_evaluated_in_eval_and_restored() -> None:
    model, x, y = linear_problem(n=20)
    wrapped = Dropper(model).train()
    res = robust_accuracy(wrapped, x, y, [0.1], attacks=("pgd",), steps=20, certify="off")
    assert wrapped.training
    assert any("train mode" in w for w in res.warnings)
    ref = robust_accuracy(model, x, y, [0.1], attacks=("pgd",), steps=20, certify="off")
    assert res.worst_case == ref.worst_case  # dropout was off during the evaluation


def test_softmax_outputs_are_refused_by_both_entry_points() -> None:
    """A softmax model would give ~10x too small margins and saturated attacks: refused, in both APIs."""
    from marginlab.estimators import estimate_margins

    model, x, y = linear_problem(n=20)
    probs = nn.Sequential(model, nn.Softmax(dim=1))
    with pytest.raises(ConfigError, match="outputs probabilities"):
        robust_accuracy(probs, x, y, [0.1], attacks=("pgd",), steps=5)
    with pytest.raises(ConfigError, match="outputs probabilities"):
        estimate_margins(probs, x, y, ["first-order"])


def test_both_entry_points_accept_numpy_grey_images_and_a_scalar_eps() -> None:
    from marginlab.estimators import estimate_margins

    model, x, y = linear_problem(n=20)
    ref = estimate_margins(model, x, y, ["first-order"])["first-order"]
    got = estimate_margins(model, x.numpy()[:, 0], y.numpy(), ["first-order"])["first-order"]
    assert torch.equal(ref.values, got.values) and ref.kind == "estimate" and got.seconds >= 0
    res = robust_accuracy(model, x.numpy(), y.numpy(), 0.1, attacks=("pgd",), steps=5)
    assert res.eps == [0.1]
    for bad, match in [
        (x.flatten(1), "flattened"),
        ((x * 255).to(torch.uint8), "floats in"),
        (x * 3, "[0, 1]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            estimate_margins(model, bad, y, ["first-order"])
        with pytest.raises(ConfigError, match=match):
            robust_accuracy(model, bad, y, [0.1], attacks=("pgd",))


class Quantized(nn.Module):
    """Rounds its input to 4 levels first: the input gradient is zero almost everywhere."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 4) / 4)


def test_vanishing_gradients_are_flagged() -> None:
    model, x, y = linear_problem(n=20)
    res = robust_accuracy(Quantized(model), x, y, [0.1], attacks=("pgd",), steps=5)
    assert any("exactly zero input gradient" in w for w in res.warnings)
    clean = robust_accuracy(model, x, y, [0.1], attacks=("pgd",), steps=5)
    assert not any("gradient" in w for w in clean.warnings)


def test_fewer_classes_drop_dlr_attacks() -> None:
    class Fake:
        class Att:
            n_target_classes = 9

        def __init__(self) -> None:
            self.apgd_targeted, self.fab = Fake.Att(), Fake.Att()
            self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]

    aa = Fake()
    notes = _fit_to_problem(aa, 2)
    assert aa.attacks_to_run == ["apgd-ce", "fab-t", "square"] and aa.fab.n_target_classes == 1
    assert len(notes) == 1 and "apgd-t skipped" in notes[0] and "more than 2 classes" in notes[0]
    assert _fit_to_problem(Fake(), 10) == []
    square = Fake()
    assert "Square needs images" in _fit_to_problem(square, 10, square_ok=False)[0]
    assert square.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t"]


def test_robustness_curve_is_the_survival_function() -> None:
    grid, acc = robustness_curve([-1.0, 0.5, 0.5, 2.0, float("inf"), float("nan")])
    assert grid.tolist() == [0.0, 0.5, 2.0]
    assert acc.tolist() == pytest.approx([4 / 6, 2 / 6, 1 / 6])
    _, acc2 = robustness_curve(np.array([0.1, 0.3]), eps=[0.0, 0.1, 0.2, 0.3])
    assert acc2.tolist() == [1.0, 0.5, 0.5, 0.0]


def test_result_json_roundtrip_and_plot() -> None:
    model, x, y = linear_problem(n=20)
    margins = exact_margins(model, x, y, 2.0)
    res = robust_accuracy(model, x, y, [0.0, 0.1], attacks=("pgd",), steps=10, margin_upper=margins)
    assert res.worst_case[0] == res.clean_accuracy and res.attacked["pgd"][0] == 0  # nothing to do at ε = 0
    back = RobustnessResult.from_dict(json.loads(json.dumps(to_jsonable(res))))
    assert back.worst_case == res.worst_case and back.points == to_jsonable(res.points)
    assert back.at(0.1, "pgd") == res.accuracy["pgd"][1]
    fig = plot_robustness({"exact": margins.numpy()}, res, title="linear")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
    # curve, certified curve, certified points, bound points, pgd points, worst case; the band shaded
    assert len(fig.axes[0].lines) == 6 and len(fig.axes[0].collections) == 1
    assert "certified" in plot_robustness(res.margin_upper(), res).axes[0].get_ylabel()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": [-0.1]}, "eps must be"),
        ({"eps": [float("nan")]}, "eps must be"),
        ({"eps": [0.1], "attacks": ("cw",)}, "unknown attack 'cw'"),
        ({"eps": [0.1], "norm": "L1"}, "unknown norm 'L1'"),
        ({"eps": [0.1], "aa_attacks": ["apgd-ce"]}, "only with version 'custom'"),
    ],
)
def test_invalid_arguments_are_config_errors(kwargs: dict, match: str) -> None:
    model, x, y = linear_problem(n=4)
    with pytest.raises(ConfigError, match=match):
        robust_accuracy(model, x, y, **kwargs)
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        robust_accuracy(model, x * 3, y, [0.1])


def test_standard_autoattack_on_twenty_points() -> None:
    model, x, y = linear_problem(n=20, k=4, seed=3)
    res = robust_accuracy(model, x, y, [0.1], attacks=("autoattack",), batch_size=20, certify="off")
    assert_matches_margins(res, exact_margins(model, x, y, 2.0))
    assert res.settings["aa_version"] == "standard"


def test_cnn_runs_both_attacks_in_linf_and_results_are_monotone() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=4, channels=(4, 4), fc=(16,)).eval()
    with torch.no_grad():  # a fresh net predicts one class everywhere: centre its features on these inputs
        x = torch.rand(12, 1, 8, 8)
        feats = model.phi(x)
        model.head.bias.copy_(-model.head(feats).mean(0) + model.head.bias)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = robust_accuracy(
        model, x, y, [0.01, 0.05, 0.3], norm="linf", attacks=("pgd", "autoattack"), steps=10, step_size=0.01,
        aa_version="custom",
        aa_attacks=["apgd-ce", "apgd-t"], aa_iters=10, certify="off",
    )  # fmt: skip
    assert res.norm == "Linf" and res.clean_accuracy == 1.0
    pgd, worst = res.accuracy["pgd"], res.worst_case
    assert all(w <= p for w, p in zip(worst, pgd, strict=True))
    assert worst == sorted(worst, reverse=True) and worst[-1] < 1.0
    # PGD runs only on the bound's survivors, and each ε starts from the previous ε's survivors
    assert res.attacked["pgd"] == [round(a * 12) for a in res.accuracy["bound"]]
    assert res.attacked["bound"][1:] == [round(w * 12) for w in worst[:-1]]
