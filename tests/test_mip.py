"""The ``mip`` estimator against trusted references: the closed forms on linear models (R^d and the box),
brute force on a 2-D ReLU net, crown <= exact <= every attack (and no PGD point below the certified lower
end), honest brackets under a time limit, and every perturbation it reports checked by a forward pass."""

import copy
import csv
import dataclasses
import json
import math
import sys

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.milp import network_blocks
from marginlab.bounds.network import network_graph
from marginlab.cli import main
from marginlab.core.linear import linear_margins
from marginlab.core.linear_box import linear_margins_box
from marginlab.estimators import build_estimator, combine_upper_bounds
from marginlab.estimators.base import MarginKind
from marginlab.estimators.mip import VERIFY_TOL, Mip, require_scip
from marginlab.estimators.mip_local import pgd
from marginlab.estimators.mip_point import Setup, solve_point, targets_of
from marginlab.nets.models import build_model

pytest.importorskip("pyscipopt")


def _float64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def _run(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float, **params: object
) -> tuple[Mip, torch.Tensor]:
    mip = build_estimator("mip", **params)
    assert isinstance(mip, Mip)
    return mip, mip(model, x, y, p=p)


def _check_perturbations(mip: Mip, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> None:
    """Every point exact; each reported delta has the reported norm, stays in the domain and reaches
    the target class (a misclassified point: the region of y) by a float64 forward pass."""
    for i, r in enumerate(mip.last_details):
        assert r.status == "exact"
        assert r.lower <= r.upper and r.upper - r.lower <= mip.rtol * r.upper * (1 + 1e-9)
        if r.delta is None:  # no adversarial anywhere in the box: proved, no perturbation to check
            assert mip.domain == "box" and r.upper == math.inf
            continue
        assert r.verified
        assert math.isclose(float(torch.linalg.vector_norm(r.delta, ord=p)), r.upper, rel_tol=1e-9)
        adv = x[i].double() + r.delta
        if mip.domain == "box":
            assert adv.min() >= -1e-9 and adv.max() <= 1 + 1e-9
        with torch.no_grad():
            logits = _float64(model)(adv[None])[0]
        if r.target == int(y[i]):
            assert logits[y[i]] >= logits.max() - VERIFY_TOL
        else:
            assert logits[r.target] >= logits[y[i]] - VERIFY_TOL


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
@pytest.mark.parametrize("domain", ["rd", "box"])
def test_mip_equals_the_closed_form_on_a_linear_model(p: float, domain: str) -> None:
    """R^d: core/linear.py's closed form; the box: core/linear_box.py's (correctly classified points)."""
    torch.manual_seed(0)
    model = build_model("lr", input_shape=(1, 3, 3), num_classes=4)
    x = torch.rand(8, 1, 3, 3)
    with torch.no_grad():
        y = model(x).argmax(1)
    w, b = model.head.weight.double(), model.head.bias.double()
    closed = linear_margins if domain == "rd" else linear_margins_box
    exact = closed(w, b, x.double(), y, p=p)
    mip, got = _run(model, x, y, p, domain=domain, time_limit=30)
    assert torch.allclose(got, exact, rtol=2e-4, atol=1e-9)
    _check_perturbations(mip, model, x, y, p)
    assert mip.result_kind() is MarginKind.EXACT


def test_mip_l1_equals_the_closed_form_on_a_linear_model() -> None:
    """L1 (not an Estimator norm) through :func:`solve_point`: the closed form's dual norm is L-inf."""
    torch.manual_seed(1)
    model = build_model("lr", input_shape=(1, 2, 3), num_classes=3).double().eval()
    x = torch.rand(5, 1, 2, 3, dtype=torch.float64)
    y = model(x).argmax(1)
    exact = linear_margins(model.head.weight, model.head.bias, x, y, p=1)
    graph = network_graph(model, (1, 2, 3))
    setup = Setup(graph, network_blocks(graph), model, 1.0, False, 30.0, 1e-6, require_scip())
    for i in range(5):
        r = solve_point(setup, x[i], int(y[i]), int(y[i]), 0.0, 10.0)
        assert r.status == "exact" and r.verified
        assert math.isclose(r.upper, float(exact[i]), rel_tol=1e-5)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
def test_mip_equals_brute_force_on_a_2d_relu_net(p: float) -> None:
    """A 2-6-6-3 ReLU net on [0,1]^2: the exact margin is the distance to the nearest grid point (801 x 801)
    that another class wins, within the grid's spacing, and never above it."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)
    )
    xs = torch.rand(200, 1, 1, 2, generator=gen)
    labels = ((xs.flatten(1) - 0.5) @ torch.randn(2, 3, generator=gen)).argmax(1)
    _fit(model, xs, labels, 80)
    x = torch.rand(6, 1, 1, 2, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
        h = 1 / 800
        t = torch.arange(801, dtype=torch.float32) * h
        grid = torch.cartesian_prod(t, t)
        pred = model(grid.reshape(-1, 1, 1, 2)).argmax(1)
    mip, got = _run(model, x, y, p, time_limit=30)
    _check_perturbations(mip, model, x, y, p)
    for i in range(len(x)):
        other = grid[pred != y[i]]
        brute = float(torch.linalg.vector_norm(other - x[i].flatten(), ord=p, dim=1).min())
        assert got[i] <= brute * (1 + 1e-6) + 1e-9  # every grid point of another class is adversarial
        assert got[i] >= brute - 2 * h  # and one lies within a grid step of the closest adversarial point


def _small_net(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 4-8-8-3 ReLU net on random data, fitted a little so that its boundaries cross the box, and 12
    points with labels: its predictions, except for three misclassified points."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    x = torch.rand(60, 1, 2, 2, generator=gen)
    y = ((x.flatten(1) - 0.5) @ torch.randn(4, 3, generator=gen)).argmax(1)
    _fit(model, x, y, 60)
    with torch.no_grad():
        labels = model(x[:12]).argmax(1)
    labels[[1, 6, 10]] = (labels[[1, 6, 10]] + 1) % 3  # three misclassified points
    return model, x[:12], labels


def _no_pgd_point_within(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, p: float
) -> None:
    """PGD from 8 random starts finds no adversarial point within ``radius`` (certified lower ends)."""
    m64 = _float64(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = m64(x.double())
    for i in range(len(x)):
        eps = float(radius[i]) * (1 - 1e-6)
        specs, _ = targets_of(int(y[i]), int(logits[i].argmax()), logits.shape[1])
        starts = [torch.randn(x[i].numel(), generator=gen, dtype=torch.float64) for _ in range(8)]
        assert pgd(m64, x[i].double(), specs, eps, p, True, starts) is None


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
@pytest.mark.parametrize("domain", ["box", "rd"])
def test_crown_below_exact_below_every_attack_on_small_relu_nets(seed: int, p: float, domain: str) -> None:
    model, x, y = _small_net(seed)
    attacks = ["deepfool", "ddn"] if p == 2.0 else ["deepfool", "fmn"]
    out = {a: build_estimator(a)(model, x, y, p=p) for a in attacks}
    out["best"] = combine_upper_bounds([out[a] for a in attacks])
    out["crown"] = build_estimator("crown", domain=domain)(model, x, y, p=p)
    mip, exact = _run(model, x, y, p, domain=domain, time_limit=30)
    _check_perturbations(mip, model, x, y, p)
    assert (out["crown"].abs() <= exact.abs() * (1 + 1e-6) + 1e-9).all()
    for name in [*attacks, "best"]:  # attacks that failed give inf, which bounds nothing
        assert (exact.abs() <= out[name].abs() * (1 + 1e-6) + 1e-9).all(), name
    assert torch.equal(exact > 0, out["crown"] > 0)
    lower = torch.tensor([r.lower for r in mip.last_details])
    if domain == "box":
        _no_pgd_point_within(model, x, y, lower, p)


def test_the_box_only_removes_perturbations() -> None:
    model, x, y = _small_net(2)
    _, rd = _run(model, x, y, math.inf, domain="rd")
    _, box = _run(model, x, y, math.inf, domain="box")
    assert (box.abs() >= rd.abs() * (1 - 1e-4)).all()


def _mid_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 36-40-40-5 net whose points take SCIP seconds: enough to stop it early."""
    torch.manual_seed(3)
    model = build_model("mlp", input_shape=(1, 6, 6), widths=(40, 40), num_classes=5).eval()
    x = torch.rand(3, 1, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_a_time_limit_gives_honest_brackets_never_exact() -> None:
    """Out of time before any radius test: every point is "time limit" (a perturbation found by the first
    search) or "unsolved", with lower <= upper <= the attack's radius, values = signed upper, the kind an
    upper bound; the lower end is certified (no PGD point inside) and the perturbation checked."""
    model, x, y = _mid_net()
    radius = build_estimator("best")(model, x, y, p=math.inf).abs()
    mip, got = _run(model, x, y, math.inf, time_limit=1e-3)
    assert mip.result_kind() is MarginKind.UPPER
    columns = mip.point_columns()
    assert columns["status"] == [r.status for r in mip.last_details]
    for i, r in enumerate(mip.last_details):
        assert r.status in ("time limit", "unsolved")
        assert 0 < r.lower < r.upper <= radius[i].item() * (1 + 1e-9)
        assert got[i] == r.upper == columns["upper"][i] and columns["lower"][i] == r.lower
        if r.status == "time limit":
            assert r.delta is not None and r.verified
            adv = x[i].double() + r.delta
            assert adv.min() >= -1e-9 and adv.max() <= 1 + 1e-9
            with torch.no_grad():
                logits = _float64(model)(adv[None])[0]
            assert logits[r.target] >= logits[y[i]] - VERIFY_TOL
    _no_pgd_point_within(model, x, y, torch.tensor([r.lower for r in mip.last_details]), math.inf)


def test_point_columns_and_arrays_follow_the_sign_rule() -> None:
    """Per point: status, signed lower/upper (negative for misclassified points) and the perturbations
    as one array [N,*in]; none of them among the parameters (init fields) that summaries record."""
    model, x, y = _small_net(0)
    mip, got = _run(model, x, y, math.inf, time_limit=30)
    columns, arrays = mip.point_columns(), mip.point_arrays()
    assert set(columns) == {"status", "lower", "upper"} and set(arrays) == {"delta"}
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any() and (~wrong).any()
    for i, r in enumerate(mip.last_details):
        sign = -1 if wrong[i] else 1
        assert columns["upper"][i] == got[i] == sign * r.upper and columns["lower"][i] == sign * r.lower
        assert torch.equal(torch.from_numpy(arrays["delta"][i]), r.delta)
    assert arrays["delta"].shape == (len(x), 1, 2, 2)
    params = {f.name for f in dataclasses.fields(Mip) if f.init}
    assert "last_details" not in params and params >= {"time_limit", "rtol", "upper", "domain", "jobs"}
    two, again = _run(model, x, y, math.inf, time_limit=30, jobs=2)  # two forked workers: the same results
    assert torch.equal(again, got) and two.point_columns() == columns


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
        lower, upper, exact = (abs(float(row[f"{k}[box]"])) for k in ("crown", "best", "mip"))
        assert row["mip.status"] == "exact"
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
