"""The domain of a margin ([0,1]^d or R^d) in every result: the box closed forms of linear margins against
LPs (HiGHS) and a QP (SLSQP), estimators and the ``margins`` command in both domains (exact-linear, crown
and mip agree within their kinds), the per-point result hooks, and ``best``'s time counted once."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.cli import main
from marginlab.core.linear import linear_margins
from marginlab.core.linear_box import box_distance, linear_margins_box
from marginlab.data import load_dataset
from marginlab.estimators import ESTIMATORS, MarginKind, build_estimator, estimate_margins
from marginlab.estimators import best as best_module
from marginlab.estimators.base import Estimator
from marginlab.lab.margins_table import read_columns, read_domains
from marginlab.nets.models import build_model

P_NORMS = [1, 2, math.inf]


# -- the closed forms of core/linear_box.py against a second method ----------------------------------
def _reference(a: np.ndarray, c: float, x: np.ndarray, p: float) -> float:
    """min ||delta||_p s.t. a.delta >= c, 0 <= x + delta <= 1: an LP (HiGHS) for p = 1, inf; SLSQP for 2."""
    d = len(a)
    lo, hi = -x, 1 - x
    if p == math.inf:  # variables [delta, t]: minimise t with |delta_i| <= t
        eye, ones = np.eye(d), np.ones((d, 1))
        rows = np.vstack([np.r_[-a, 0.0], np.hstack([eye, -ones]), np.hstack([-eye, -ones])])
        res = linprog(np.r_[np.zeros(d), 1.0], A_ub=rows, b_ub=np.r_[-c, np.zeros(2 * d)],
                      bounds=[*zip(lo, hi, strict=True), (0, None)], method="highs")  # fmt: skip
    elif p == 1:  # delta = u - v with 0 <= u <= hi, 0 <= v <= -lo
        res = linprog(np.ones(2 * d), A_ub=np.r_[-a, a][None], b_ub=[-c],
                      bounds=[(0, h) for h in hi] + [(0, -v) for v in lo], method="highs")  # fmt: skip
    else:
        cons = {"type": "ineq", "fun": lambda z: a @ z - c, "jac": lambda z: a}
        res = minimize(lambda z: z @ z, np.clip(a * c / (a @ a), lo, hi), jac=lambda z: 2 * z,
                       constraints=[cons], bounds=list(zip(lo, hi, strict=True)), method="SLSQP",
                       options={"ftol": 1e-15, "maxiter": 1000})  # fmt: skip
        return math.sqrt(res.fun) if res.success else math.inf
    return float(res.fun) if res.status == 0 else math.inf  # status 2: infeasible


@pytest.mark.parametrize("p", P_NORMS)
def test_box_distance_matches_lp_and_qp(p: float) -> None:
    rng = np.random.default_rng(1)
    cases, finite = [], 0
    for _ in range(25):
        a, x = rng.normal(size=7), rng.uniform(size=7)
        x[rng.uniform(size=7) < 0.3] = float(rng.integers(0, 2))  # saturated pixels, as in images
        reach = float(np.sum(np.abs(a) * np.where(a > 0, 1 - x, x)))
        c = reach * rng.uniform(0.05, 1.15)  # beyond 1: the whole box cannot reach the target
        cases.append((a, c, x))
    got = box_distance(*(torch.tensor(np.array(v)) for v in zip(*cases, strict=True)), p=p)
    for (a, c, x), value in zip(cases, got.tolist(), strict=True):
        want = _reference(a, c, x, p)
        if math.isinf(want):
            assert value == math.inf
        else:
            finite += 1
            assert value == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert finite >= 18  # most cases are reachable: the comparison is not vacuous
    zero = box_distance(torch.ones(1, 3), torch.tensor([-1.0]), torch.full((1, 3), 0.5), p=p)
    assert zero.tolist() == [0.0]  # already on the target side


def _linear(k: int, d: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w, b = (
        torch.randn(k, d, generator=g, dtype=torch.float64),
        torch.randn(k, generator=g, dtype=torch.float64),
    )
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    x[torch.rand(n, d, generator=g) < 0.3] = 0.0
    return w, b, x, (x @ w.T + b).argmax(1)


@pytest.mark.parametrize("p", P_NORMS)
def test_box_margins_are_the_smallest_pairwise_box_distance(p: float) -> None:
    """Correctly classified points: the minimum over classes of the LP / QP distance within the box;
    misclassified ones: minus the largest distance (within the box) to a halfspace that y must regain."""
    w, b, x, y = _linear(k=4, d=6, n=16, seed=2)
    correct = torch.arange(16) >= 4
    y[~correct] = (y[~correct] + 1) % 4
    got = linear_margins_box(w, b, x, y, p=p)
    rd = linear_margins(w, b, x, y, p=p)
    for i in range(len(x)):
        yi = int(y[i])
        g = {k: float((w[yi] - w[k]) @ x[i] + b[yi] - b[k]) for k in range(4) if k != yi}
        if correct[i]:  # cross any pairwise boundary: a = w_k - w_y, c = g_k > 0
            want = min(_reference((w[k] - w[yi]).numpy(), gk, x[i].numpy(), p) for k, gk in g.items())
        else:  # regain every violated halfspace g_k >= 0: a = w_y - w_k, c = -g_k > 0
            want = -max(
                _reference((w[yi] - w[k]).numpy(), -gk, x[i].numpy(), p) for k, gk in g.items() if gk < 0
            )
        assert float(got[i]) == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert bool((got[correct] >= rd[correct] * (1 - 1e-9)).all())  # the box forbids directions
    assert bool((got[correct] > rd[correct] * 1.01).any())  # and here it binds
    assert bool((got[~correct] <= rd[~correct] * (1 - 1e-9)).all())  # further from y's region too


@pytest.mark.parametrize("p", P_NORMS)
def test_box_margins_equal_rd_where_the_box_does_not_bind(p: float) -> None:
    """Points deep inside the box with small margins: the minimal perturbation stays inside."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    x = 0.4 + 0.2 * torch.rand(30, 8, generator=g, dtype=torch.float64)
    b = -(x[:5] @ w.T).diagonal()  # boundaries pass near the points: margins of a few hundredths
    y = (x @ w.T + b).argmax(1)
    y[:5] = (y[:5] + 1) % 5  # misclassified points: same formula, same value while nothing binds
    rd = linear_margins(w, b, x, y, p=p)
    assert float(rd.abs().max()) < 0.4  # the perturbations stay within [0, 1]
    torch.testing.assert_close(linear_margins_box(w, b, x, y, p=p), rd, rtol=1e-9, atol=1e-12)


def test_box_margins_edge_cases() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.0, 0.9])
    x = torch.tensor([[1.0, 0.5], [0.95, 0.5]], dtype=torch.float64)
    # f_0 - f_1 = x_1 - 0.9: class 1 wins once x_1 drops below 0.9 (L-inf distance 0.1 and 0.05)
    got = linear_margins_box(w, b, x, torch.tensor([0, 0]), p=math.inf)
    torch.testing.assert_close(got, torch.tensor([0.1, 0.05], dtype=torch.float64))
    # with b_1 = -2 class 1 never wins inside the box (f_0 = x_1 >= 0 > -2)
    unreachable = linear_margins_box(w, torch.tensor([0.0, -2.0]), x, torch.tensor([0, 0]), p=2)
    assert unreachable.tolist() == [math.inf, math.inf]  # no image of the box changes the prediction
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        linear_margins_box(w, b, x + 1, torch.tensor([0, 0]))


# -- estimators in both domains ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lr_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model("lr", input_shape=data.input_shape, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x[:800]), data.y[:800]).backward()
        opt.step()
    return model.eval(), data.x[800:810], data.y[800:810]


@pytest.mark.parametrize("p", [2, math.inf], ids=["L2", "Linf"])
def test_exact_linear_and_crown_in_both_domains(lr_model, p) -> None:
    model, x, y = lr_model
    res = {d: estimate_margins(model, x, y, ["exact-linear", "crown"], p=p, domain=d) for d in ("box", "rd")}
    for d, r in res.items():
        assert {v.domain for v in r.values()} == {d} and r["exact-linear"].kind is MarginKind.EXACT
        exact, crown = r["exact-linear"].values, r["crown"].values
        assert bool((crown.abs() <= exact.abs() * (1 + 1e-6)).all())  # a lower bound in its domain
    torch.testing.assert_close(res["rd"]["crown"].values, res["rd"]["exact-linear"].values, rtol=2e-4, atol=0)
    box, rd = res["box"]["exact-linear"].values, res["rd"]["exact-linear"].values
    assert bool((box.abs() >= rd.abs() * (1 - 1e-6)).all()) and float((box / rd).median()) > 1.05
    with torch.no_grad():
        w, b = model.head.weight.double(), model.head.bias.double()
    torch.testing.assert_close(box, linear_margins_box(w, b, x.flatten(1), y, p=p))


def test_estimators_that_cannot_honour_a_domain_say_so_in_one_line(lr_model, caplog) -> None:
    model, x, y = lr_model

    @dataclass(kw_only=True)
    class BoxOnlyLower(Estimator):
        kind = MarginKind.LOWER
        domains = frozenset({"box"})

        def _estimate(self, model, x, y, p):
            return torch.zeros(len(x))

    with pytest.raises(ConfigError, match="box") as e:  # a bound of the box margin is none of R^d's
        BoxOnlyLower(domain="rd")
    assert "\n" not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="marginlab"):
        out = estimate_margins(model, x, y, ["first-order", "lipschitz"], domain="box")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "first-order" in lines[0] and "R^d" in lines[0] and "\n" not in lines[0]
    assert out["first-order"].domain == "rd" and out["lipschitz"].domain == "box"
    with pytest.raises(ConfigError, match="domain"):
        build_estimator("crown", domain="sphere")


# -- the margins command -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lr_weights(lr_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "lr.pt"
    torch.save(lr_model[0].state_dict(), path)
    return path


def _margins(weights: Path, out: Path, *extra: str, n: int = 5) -> tuple[list[str], dict, dict]:
    argv = ["margins", "--model", "lr", "--weights", str(weights), "--data", "digits", "--n", str(n)]
    assert main([*argv, "--norm", "inf", *extra, "--out", str(out)]) == 0
    with open(out / "margins.csv") as f:
        header = next(csv.reader(f))
    numeric = [h for h in header if not h.endswith(".status")]
    return header, read_columns(out / "margins.csv", numeric), json.loads((out / "summary.json").read_text())


def test_margins_command_states_the_domain_and_the_exact_columns_agree(lr_weights, tmp_path, capsys) -> None:
    pytest.importorskip("pyscipopt")
    names = "exact-linear,crown,mip,first-order"
    seen = {}
    for domain in ("box", "rd"):
        header, cols, summary = _margins(
            lr_weights, tmp_path / domain, "--domain", domain, "--estimators", names
        )
        first = "first-order[rd]"  # an estimate of the R^d margin whatever was asked
        margins = [h for h in header[3:] if "." not in h]  # mip may add mip.status, mip.lower, ...
        assert margins == [f"exact-linear[{domain}]", f"crown[{domain}]", f"mip[{domain}]", first]
        assert {h for h in header if h.startswith("mip.")} <= {"mip.status", "mip.lower", "mip.upper"}
        assert summary["domain"] == domain and summary["estimators"]["crown"]["domain"] == domain
        assert summary["estimators"]["first-order"]["domain"] == "rd"
        np.testing.assert_allclose(cols[f"mip[{domain}]"], cols[f"exact-linear[{domain}]"], rtol=1e-5)
        assert (np.abs(cols[f"crown[{domain}]"]) <= np.abs(cols[f"mip[{domain}]"]) * (1 + 1e-6)).all()
        seen[domain] = cols[f"exact-linear[{domain}]"]
        assert f"crown[{domain}]" in capsys.readouterr().out  # the console names the domain too
    assert (np.abs(seen["box"]) > np.abs(seen["rd"]) * 1.01).any()  # the two domains differ here


def test_domain_precedence_and_default(lr_weights, tmp_path) -> None:
    header, _, summary = _margins(
        lr_weights, tmp_path / "a", "--domain", "box", "--param", "crown.domain=rd",
        "--estimators", "exact-linear,crown",
    )  # fmt: skip
    assert header[3:] == ["exact-linear[box]", "crown[rd]"] and summary["domain"] == "box"
    assert summary["estimators"]["crown"]["params"]["domain"] == "rd"
    header, _, summary = _margins(
        lr_weights, tmp_path / "b", "--estimators", "exact-linear,first-order,lipschitz"
    )
    assert (
        header[3:] == ["exact-linear[box]", "first-order[rd]", "lipschitz[box]"]
        and summary["domain"] == "box"
    )
    assert read_domains(tmp_path / "b" / "margins.csv") == {"exact-linear": "box", "first-order": "rd",
                                                             "lipschitz": "box"}  # fmt: skip


@pytest.mark.parametrize("norm", ["2", "L2"])
def test_bad_domain_is_one_line(lr_weights, tmp_path, capsys, norm) -> None:
    argv = ["margins", "--model", "lr", "--weights", str(lr_weights), "--data", "digits", "--norm", norm]
    assert main([*argv, "--domain", "sphere", "--estimators", "crown", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "domain" in err and not (tmp_path / "x").exists()


@dataclass(kw_only=True)
class _Probe(Estimator):
    """A test estimator with per-point extras: a status column and a perturbation array [N, 3]."""

    name = "probe"
    kind = MarginKind.EXACT

    def _prepare(self, model, x1, p):
        self._n = 0

    def _estimate(self, model, x, y, p):
        self._n += len(x)
        return torch.ones(len(x))

    def point_columns(self):
        return {"status": ["exact"] * (self._n - 1) + ["time limit"], "lower": [0.5] * self._n}

    def point_arrays(self):
        return {"delta": np.arange(self._n * 3, dtype=np.float64).reshape(self._n, 3)}

    def result_kind(self):
        return MarginKind.UPPER  # one point ran out of time


def test_point_columns_arrays_and_kind_reach_the_files(lr_weights, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(ESTIMATORS._items, "probe", _Probe)
    header, cols, summary = _margins(lr_weights, tmp_path / "a", "--estimators", "probe", n=4)
    assert header == ["index", "label", "prediction", "probe[box]", "probe.status", "probe.lower"]
    np.testing.assert_array_equal(cols["probe.lower"], [0.5] * 4)
    assert summary["estimators"]["probe"]["kind"] == "upper bound"
    assert not (tmp_path / "a" / "arrays.npz").exists()  # only when asked
    _margins(lr_weights, tmp_path / "b", "--estimators", "probe", "--save-arrays", n=4)
    with np.load(tmp_path / "b" / "arrays.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["index", "probe.delta"] and npz["probe.delta"].shape == (4, 3)
        np.testing.assert_array_equal(npz["index"], cols["index"])


def test_summary_holds_no_per_point_data(lr_weights, tmp_path) -> None:
    """mip's per-point details (perturbations) once made summary.json grow with the points."""
    pytest.importorskip("pyscipopt")
    sizes = {}
    for n in (2, 8):
        _, _, summary = _margins(lr_weights, tmp_path / str(n), "--estimators", "mip", n=n)
        params = summary["estimators"]["mip"]["params"]
        assert "last_details" not in params and all(isinstance(v, str | int | float) for v in params.values())
        sizes[n] = (tmp_path / str(n) / "summary.json").stat().st_size
    assert abs(sizes[8] - sizes[2]) < 64 and sizes[8] < 4000


# -- best's time -----------------------------------------------------------------------------------------
def test_best_counts_the_time_of_its_own_attacks_once(lr_model, monkeypatch) -> None:
    """A fake clock: deepfool costs 1 s, fmn 2 s. An attack with its own column costs best nothing."""
    model, x, y = lr_model
    clock = {"t": 0.0}
    cost = {"deepfool": 1.0, "fmn": 2.0}

    @dataclass(kw_only=True)
    class Timed(Estimator):
        kind = MarginKind.UPPER
        cost: float = 0.0

        def _estimate(self, model, x, y, p):
            clock["t"] += self.cost
            return torch.ones(len(x))

    def fake_build(name: str, **kw: object) -> Estimator:
        if name == "best":
            return build_estimator(name, **kw)
        return type(name, (Timed,), {"name": name})(cost=cost[name])

    monkeypatch.setattr(best_module, "build_estimator", fake_build)
    monkeypatch.setattr(best_module, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    attacks = {"best": {"attacks": ["deepfool", "fmn"]}}
    out = estimate_margins(model, x, y, ["deepfool", "best"], params=attacks)
    assert out["deepfool"].seconds == 1.0 and out["best"].seconds == 2.0  # fmn only: deepfool is reused
    alone = estimate_margins(model, x, y, ["best"], params=attacks)
    assert alone["best"].seconds == 3.0  # both run for best, each counted once
