"""The ``mip`` estimator: the closed form on linear models, and crown <= exact <= every attack on small
ReLU nets, with every perturbation it reports checked by a forward pass."""

import csv
import json
import math
import sys

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.milp import network_blocks
from marginlab.bounds.network import network_ops
from marginlab.cli import main
from marginlab.core.linear import linear_margins
from marginlab.estimators import build_estimator, combine_upper_bounds
from marginlab.estimators.mip import VERIFY_TOL, _float64_copy, _Setup, require_scip, solve_point
from marginlab.nets.models import build_model

pytest.importorskip("pyscipopt")


def _check_perturbations(
    mip, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float, box: bool
) -> None:
    """Each reported delta has the reported norm, stays in the domain and reaches the target class."""
    for i, r in enumerate(mip.last_details):
        assert r.status == "exact"
        if r.delta is None:  # no adversarial anywhere in the box: proved, no perturbation to check
            assert box and r.upper == math.inf
            continue
        assert r.verified
        assert math.isclose(float(torch.linalg.vector_norm(r.delta, ord=p)), r.upper, rel_tol=1e-9)
        adv = x[i].double() + r.delta
        if box:
            assert adv.min() >= -1e-9 and adv.max() <= 1 + 1e-9
        with torch.no_grad():
            logits = _float64_copy(model)(adv[None])[0]
        if r.target == int(y[i]):  # misclassified point: moved into the region of y
            assert logits[y[i]] >= logits.max() - VERIFY_TOL
        else:
            assert logits[r.target] >= logits[y[i]] - VERIFY_TOL


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
def test_mip_equals_the_closed_form_on_a_linear_model(p: float) -> None:
    torch.manual_seed(0)
    model = build_model("lr", input_shape=(1, 3, 3), num_classes=4)
    x = torch.rand(8, 1, 3, 3)
    with torch.no_grad():
        y = model(x).argmax(1)
    exact = linear_margins(model.head.weight.double(), model.head.bias.double(), x.double(), y, p=p)
    mip = build_estimator("mip", domain="rd", time_limit=30)
    got = mip(model, x, y, p=p)
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-7)
    _check_perturbations(mip, model, x, y, p, box=False)


def test_mip_l1_equals_the_closed_form_on_a_linear_model() -> None:
    """L1 (not an Estimator norm) through :func:`solve_point`: the closed form's dual norm is L-inf."""
    torch.manual_seed(1)
    model = build_model("lr", input_shape=(1, 2, 3), num_classes=3).double().eval()
    x = torch.rand(5, 1, 2, 3, dtype=torch.float64)
    y = model(x).argmax(1)
    exact = linear_margins(model.head.weight, model.head.bias, x, y, p=1)
    ops = network_ops(model, (1, 2, 3))
    setup = _Setup(ops, network_blocks(ops), 1.0, False, 30.0)
    for i in range(5):
        r = solve_point(model, setup, x[i], int(y[i]), int(y[i]), 10.0)
        assert r.status == "exact" and r.verified
        assert math.isclose(r.upper, float(exact[i]), rel_tol=1e-5)


def _small_net(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 4-8-8-3 ReLU net on random data, fitted a little so that its boundaries cross the box."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    x = torch.rand(60, 1, 2, 2, generator=gen)
    y = ((x.flatten(1) - 0.5) @ torch.randn(4, 3, generator=gen)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:12], y[:12]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
@pytest.mark.parametrize("domain", ["box", "rd"])
def test_crown_below_exact_below_every_attack_on_small_relu_nets(seed: int, p: float, domain: str) -> None:
    model, x, y = _small_net(seed)
    attacks = ["deepfool", "ddn"] if p == 2.0 else ["deepfool", "fmn"]
    out = {a: build_estimator(a)(model, x, y, p=p) for a in attacks}
    out["best"] = combine_upper_bounds([out[a] for a in attacks])
    out["crown"] = build_estimator("crown", domain=domain)(model, x, y, p=p)
    mip = build_estimator("mip", domain=domain, time_limit=30)
    exact = mip(model, x, y, p=p)
    _check_perturbations(mip, model, x, y, p, box=domain == "box")
    assert (out["crown"].abs() <= exact.abs() * (1 + 1e-6) + 1e-9).all()
    for name in [*attacks, "best"]:  # attacks that failed give inf, which bounds nothing
        assert (exact.abs() <= out[name].abs() * (1 + 1e-6) + 1e-9).all(), name
    assert torch.equal(exact > 0, out["crown"] > 0)


def test_the_box_only_removes_perturbations() -> None:
    model, x, y = _small_net(2)
    rd = build_estimator("mip", domain="rd")(model, x, y, p=math.inf)
    box = build_estimator("mip", domain="box")(model, x, y, p=math.inf)
    assert (box.abs() >= rd.abs() * (1 - 1e-7)).all()


def test_time_limit_reports_a_bracket() -> None:
    """A net whose hardest point SCIP needs seconds to close (over 10 s here) but finds a perturbation for
    in ~0.2 s: the time limit grows until some point stops at it with a perturbation found, which must
    then be reported as an honest bracket ``lower < upper`` (upper: that perturbation's norm, no more than
    the initial attack's). On a machine too slow (or fast) for every limit tried the test fails."""
    torch.manual_seed(3)
    model = build_model("mlp", input_shape=(1, 6, 6), widths=(40, 40), num_classes=5).eval()
    x = torch.rand(3, 1, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    radius = build_estimator("deepfool")(model, x, y, p=math.inf).abs()  # the initial radius of mip
    bracketed = []
    for limit in (0.1, 0.3, 1.0, 3.0):
        mip = build_estimator("mip", time_limit=limit)
        got = mip(model, x, y, p=math.inf)
        for i, (value, r) in enumerate(zip(got.tolist(), mip.last_details, strict=True)):
            assert r.status in ("exact", "time limit", "unsolved")
            assert 0 <= r.lower <= r.upper * (1 + 1e-9) and value == r.upper
            assert r.upper <= radius[i].item() * (1 + 1e-5)
            if r.status == "time limit":
                bracketed.append(limit)
                assert r.lower < r.upper and r.seconds >= 0.9 * limit  # it stopped because time ran out
                assert r.delta is not None and r.verified
                assert math.isclose(float(r.delta.abs().max()), r.upper, rel_tol=1e-9)
                adv = x[i].double() + r.delta  # the perturbation, checked by a forward pass here
                assert adv.min() >= -1e-9 and adv.max() <= 1 + 1e-9
                with torch.no_grad():
                    logits = _float64_copy(model)(adv[None])[0]
                assert logits[r.target] >= logits[y[i]] - VERIFY_TOL
        if bracketed:
            break
    assert bracketed, "no point stopped at the time limit with a perturbation found: the branch never ran"


def test_missing_solver_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyscipopt", None)
    with pytest.raises(ConfigError, match=r"marginlab\[exact\]"):
        require_scip()
    with pytest.raises(ConfigError, match=r"marginlab\[exact\]"):
        build_estimator("mip")


def test_bracket_command_writes_table_summary_and_figure(tmp_path, capsys) -> None:
    """``marginlab margins --estimators bracket,mip``: crown <= mip <= best, quantiles of the ratio."""
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), widths=(8, 8))
    d = load_digits()
    x, y = torch.tensor(d.data / 16, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(d.target)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:800]), y[:800]).backward()
        opt.step()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "b"
    argv = ["margins", "--model", "mlp", "--option", "widths=[8,8]", "--weights", str(weights), "--data"]
    argv += ["digits", "--n", "6", "--norm", "inf", "--estimators", "bracket,mip", "--out", str(out)]
    assert main([*argv, "--param", "bracket.time_limit=20"]) == 0
    rows = list(csv.DictReader((out / "margins.csv").open()))
    assert len(rows) == 6
    for row in rows:
        lower, upper, exact = (abs(float(row[k])) for k in ("crown", "best", "mip"))
        assert row["mip_status"] == "exact"
        assert lower <= exact * (1 + 1e-6) and exact <= upper * (1 + 1e-6)
        assert math.isclose(float(row["ratio"]), upper / lower, rel_tol=1e-9)
    summary = json.loads((out / "summary.json").read_text())["bracket"]
    ratios = sorted(float(r["ratio"]) for r in rows)
    assert math.isclose(summary["ratio_median"], (ratios[2] + ratios[3]) / 2, rel_tol=1e-9)
    assert summary["exact_solved"] == 6 and summary["ratio_p90"] >= summary["ratio_median"] >= 1
    assert (out / "bracket.png").stat().st_size > 1000
    assert "bracket ratio" in capsys.readouterr().out
    assert main([*argv[:-4], "--estimators", "bracket,first-order", "--out", str(out)]) == 2
    assert "bracket combines with crown, best and mip only" in capsys.readouterr().err
    for bad in ("bracket.steps=3", "bracket.time_limit=-1", "bracket.domain=sphere"):
        assert main([*argv, "--param", bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1
