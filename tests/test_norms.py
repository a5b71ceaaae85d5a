"""The one norm type, :class:`marginlab.core.norms.Norm`: every accepted spelling, the dual norms against
Hoelder's equality (solved independently: closed-form maximisers and linear programs), the messages of the
places that ask it, and ``marginlab margins`` writing the same files for ``--norm 2`` and ``--norm L2``."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from conftest import untrained_mlp_weights
from marginlab.base.errors import ConfigError
from marginlab.base.fsio import to_jsonable
from marginlab.cli import main
from marginlab.core.linear import linear_margins
from marginlab.core.norms import Norm
from marginlab.estimators import build_estimator, norm_order
from marginlab.plots.common import norm_name
from marginlab.robustness import NORMS, RobustnessSettings, normalize_norm
from marginlab.training.tracking import TrackingConfig

SPELLINGS = {
    Norm.L1: [1, 1.0, "1", "1.0", "l1", "L1", " L1 ", np.float64(1.0), np.int64(1), torch.tensor(1.0)],
    Norm.L2: [2, 2.0, "2", "2.0", "l2", "L2", "l2.0", " L2\n", np.float32(2.0), torch.tensor(2)],
    Norm.Linf: [
        math.inf,
        np.inf,
        "inf",
        "INF",
        "infinity",
        "∞",
        "linf",
        "Linf",
        "LINF",
        "L∞",
        "linfinity",
        " Linf ",
        torch.tensor(math.inf),
    ],  # fmt: skip
}
NOT_NORMS = [3, 0.5, 0, -1, -math.inf, math.nan, "l3", "L3", "", " ", "two", "l", "2 2", "+inf", True, False,
             None, [2], (2,), {"p": 2}, torch.tensor([2.0, 2.0])]  # fmt: skip


@pytest.mark.parametrize(("norm", "value"), [(n, v) for n, vs in SPELLINGS.items() for v in vs])
def test_every_spelling_parses_to_its_norm(norm: Norm, value: object) -> None:
    parsed = Norm.parse(value)
    assert parsed is norm and Norm.parse(parsed) is norm


@pytest.mark.parametrize("value", NOT_NORMS, ids=repr)
def test_other_values_are_one_line_config_errors(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        Norm.parse(value)
    assert str(err.value) == f"unsupported norm p={value!r}; use 1, 2 or inf ('l1', 'l2', 'linf')"


def test_canonical_spelling_order_and_dual() -> None:
    # written out, not computed: the spellings the run files record and the textbook exponents
    table = {Norm.L1: ("L1", 1.0, "Linf", math.inf, "L1"), Norm.L2: ("L2", 2.0, "L2", 2.0, "L2"),
             Norm.Linf: ("Linf", math.inf, "L1", 1.0, "L∞")}  # fmt: skip
    for norm, (name, p, dual, q, symbol) in table.items():
        assert (norm.name, norm.value, str(norm), f"{norm}") == (name, name, name, name)
        assert norm == name and type(str(norm)) is str
        assert (norm.p, norm.dual.name, norm.q, norm.symbol) == (p, dual, q, symbol)
        assert norm.dual.dual is norm
        assert math.isclose(1 / p + 1 / q, 1.0)  # Hoelder conjugates (1/inf = 0)
        assert json.dumps(norm) == json.dumps(to_jsonable(norm)) == f'"{name}"'
    assert list(Norm) == [Norm.L1, Norm.L2, Norm.Linf]


def _maximiser(a: np.ndarray, p: float) -> np.ndarray:
    """A unit-Lp vector x with a . x = sup_{||x||_p <= 1} a . x (textbook closed forms, no marginlab)."""
    if p == 2.0:
        return a / np.sqrt(np.sum(a * a))
    if p == math.inf:
        return np.sign(a)
    j = int(np.argmax(np.abs(a)))
    x = np.zeros_like(a)
    x[j] = np.sign(a[j])
    return x


def _lp_sup(a: np.ndarray, p: float) -> float:
    """sup a . x over the unit L1 or Linf ball, as a linear program (scipy)."""
    d = len(a)
    if p == math.inf:
        res = linprog(-a, bounds=[(-1, 1)] * d, method="highs")
    else:  # x = u - v, u, v >= 0, sum(u + v) <= 1
        c, ones = np.concatenate([-a, a]), np.ones((1, 2 * d))
        res = linprog(c, A_ub=ones, b_ub=[1.0], bounds=[(0, None)] * (2 * d), method="highs")
    assert res.status == 0
    return -res.fun


@pytest.mark.parametrize("norm", list(Norm))
@pytest.mark.parametrize("seed", range(5))
def test_dual_norm_is_hoelder_equality(norm: Norm, seed: int) -> None:
    """sup_{||x||_p <= 1} a . x = ||a||_q, with q = norm.q, on random vectors."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(7) * rng.uniform(0.1, 10)
    dual = float(np.linalg.norm(a, ord=norm.q))
    x = _maximiser(a, norm.p)
    assert np.linalg.norm(x, ord=norm.p) == pytest.approx(1.0)
    assert a @ x == pytest.approx(dual, rel=1e-12)  # attained
    if norm is not Norm.L2:  # the sup by an LP, independently of the closed forms
        assert _lp_sup(a, norm.p) == pytest.approx(dual, rel=1e-7)
    # and never exceeded: random points of the unit sphere of the norm
    xs = rng.standard_normal((2000, 7))
    xs /= np.linalg.norm(xs, ord=norm.p, axis=1, keepdims=True)
    assert (xs @ a).max() <= dual * (1 + 1e-12)
    # the dual of another norm is not it (for the dimension 7 used here)
    for other in Norm:
        if other.q != norm.q:
            assert not math.isclose(float(np.linalg.norm(a, ord=other.q)), dual, rel_tol=1e-9)


def test_among_restricts_and_error_sets_the_message() -> None:
    pair = (Norm.L2, Norm.Linf)
    assert Norm.parse("linf", pair) is Norm.Linf
    assert Norm.parse("L2", ("L2", "Linf")) is Norm.L2  # plain strings name members too
    with pytest.raises(ConfigError, match=r"^unsupported norm p=1; use 1, 2 or inf"):
        Norm.parse(1, pair)
    with pytest.raises(ConfigError, match=r"^bad: 'l1'$"):
        Norm.parse("l1", pair, error="bad: {value!r}")


def test_the_places_that_ask_keep_their_messages() -> None:
    """Each caller supports its own norms and words its error as it did before there was one parser."""
    with pytest.raises(ConfigError, match=r"^unsupported norm p=1; use 2 or inf$"):
        model, x, y = torch.nn.Linear(4, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1).long()
        build_estimator("first-order")(model, x, y, p=1)
    with pytest.raises(ConfigError, match=r"^unknown norm 'L1'; choose from: L2, Linf$"):
        RobustnessSettings(norm="L1")
    with pytest.raises(ConfigError, match=r"""^tracking.p must be 2 or "inf", got 'l3'$"""):
        TrackingConfig(p="l3")
    full = r"^unsupported norm p='l3'; use 1, 2 or inf \('l1', 'l2', 'linf'\)$"
    with pytest.raises(ConfigError, match=full):
        linear_margins(torch.eye(2), None, torch.zeros(1, 2), torch.zeros(1).long(), p="l3")


def test_parsed_once_where_it_enters() -> None:
    for given in ("2", 2, "l2", Norm.L2):
        s = RobustnessSettings(norm=given)
        assert s.norm is Norm.L2 and s.bound == "ddn"
        assert json.loads(json.dumps(to_jsonable(s)))["norm"] == "L2"
    assert RobustnessSettings(norm="inf").norm is Norm.Linf
    tracking = TrackingConfig(p="inf")
    assert tracking.p_value == math.inf and tracking.p == "inf"  # p is recorded as written
    assert TrackingConfig(p=2.0).norm is Norm.L2 and TrackingConfig().p == 2.0
    names = [norm_name(v) for v in (None, 2.0, "inf", 1, "L2", Norm.Linf)]
    assert names == ["", "L2", "L∞", "L1", "L2", "L∞"]


def test_deprecated_aliases_delegate_and_warn() -> None:
    assert NORMS == ("L2", "Linf")
    with pytest.warns(DeprecationWarning, match="Norm"):
        assert normalize_norm("2") == "L2" and normalize_norm("2") is Norm.L2
    with pytest.warns(DeprecationWarning, match="Norm"):
        assert norm_order("linf") == math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigError, match=r"^unknown norm 'L3'; choose from: L2, Linf$"):
            normalize_norm("L3")
        with pytest.raises(ConfigError, match=r"^unsupported norm p=1; use 2 or inf$"):
            norm_order(1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained MLP on the bundled digits (8x8), saved as a state_dict."""
    return untrained_mlp_weights(tmp_path_factory.mktemp("w"), (8,))


def _margins(out: Path, weights: Path, norm: str) -> dict:
    argv = ["margins", "--model", "mlp", "--option", "widths=[8]", "--weights", str(weights),
            "--data", "digits", "--n", "12", "--estimators", "first-order", "--norm", norm,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for est in summary["estimators"].values():
        est.pop("seconds")  # timings differ from run to run
    return summary


@pytest.mark.parametrize(("spellings", "canonical"), [(["2", "L2", "l2"], "L2"), (["inf", "Linf"], "Linf")])
def test_margins_writes_one_summary_whatever_the_spelling(weights, tmp_path, capsys, spellings, canonical):
    runs = [_margins(tmp_path / f"m{i}", weights, s) for i, s in enumerate(spellings)]
    assert runs[0]["norm"] == canonical
    for run in runs[1:]:
        assert run == runs[0]
    tables = {(tmp_path / f"m{i}" / "margins.csv").read_text() for i in range(len(spellings))}
    assert len(tables) == 1
    capsys.readouterr()
