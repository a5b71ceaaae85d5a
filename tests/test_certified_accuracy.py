"""Certified robust accuracy in the one evaluator: the band certified <= robust <= clean per ε.

References: on a linear model the exact L2 margin over R^d is a closed form (``core/linear.py``), and with
the points deep inside [0, 1] the box does not bind at the radii tested, so a certificate at ε must mean
an exact margin >= ε, and CROWN (exact on linear models) must certify every point clearly above ε. On a
trained digits MLP the attack-only evaluation of the same seed is the reference: certificates may only
spare it work, never change what it finds. The soundness checks must fire on a certifier that lies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.cli import main
from marginlab.core.linear import linear_margins
from marginlab.data import load_dataset
from marginlab.estimators import MarginKind
from marginlab.experiments.compare_results import seed_metrics
from marginlab.experiments.compare_tables import HEADLINE, _headline
from marginlab.lab.readers import read_robustness
from marginlab.nets.models import build_model
from marginlab.robustness import ATTACKS, RobustnessResult, SoundnessError, robust_accuracy
from marginlab.robustness import certify as certify_module
from marginlab.robustness import evaluate as evaluate_module
from marginlab.robustness.certify import Certificates, check_broken
from marginlab.training.loop import TrainConfig, fit

SHAPE = (1, 5, 4)  # d = 20
EPS = [0.05, 0.1, 0.2]
FAST_AA = {"aa_version": "custom", "aa_attacks": ("apgd-ce",), "aa_iters": 10}


def linear_problem(n: int = 60, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 3-class linear model, points in [0.3, 0.7]^20 (an L2 ball of radius <= 0.3 stays in the box), a
    few labels flipped so that some points are misclassified."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model("lr", input_shape=SHAPE, num_classes=3)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(3, 20, generator=gen))
        model.head.bias.copy_(torch.randn(3, generator=gen))
    x = 0.3 + 0.4 * torch.rand(n, *SHAPE, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 3
    return model.eval(), x, y


def exact_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Signed exact L2 margins over R^d by the closed form of ``core/linear.py``."""
    w, b = model.head.weight.detach().double(), model.head.bias.detach().double()
    return linear_margins(w, b, x.flatten(1).double(), y, p=2).numpy()


def assert_band(res: RobustnessResult) -> None:
    assert res.certified is not None
    for c, r in zip(res.certified, res.worst_case, strict=True):
        assert c <= r + 1e-12 and r <= res.clean_accuracy + 1e-12


def test_linear_certificates_are_exact_margins_and_spare_every_attack() -> None:
    model, x, y = linear_problem()
    exact = exact_margins(model, x, y)
    res = robust_accuracy(model, x, y, EPS, attacks=("pgd",), steps=50, step_size=0.02)
    off = robust_accuracy(model, x, y, EPS, attacks=("pgd",), steps=50, step_size=0.02, certify="off")
    assert res.certifier is not None and res.certifier["domain"] == "rd" and off.certified is None
    assert_band(res)
    radii = res.margin_lower()
    assert radii is not None
    correct = np.asarray(res.points["correct"])
    for j, e in enumerate(EPS):
        cert = correct & (radii >= e)
        assert (exact[cert] >= e * (1 - 1e-6)).all()  # sound: never certified beyond the exact margin
        clear = correct & (exact > e * 1.01)
        assert cert[clear].all() and clear.sum() >= 5  # tight: CROWN is exact on a linear model
        assert res.certified[j] == pytest.approx(cert.mean())
        # the same robust accuracy as the attack-only run, here exact: the band has closed
        assert res.worst_case[j] == off.worst_case[j] == pytest.approx(res.certified[j])
        assert sum(v[j] for v in res.decided.values()) == correct.sum()
    assert res.attacked["pgd"] == res.decided["attacked"] == [0, 0, 0]  # nothing left to attack
    assert sum(off.attacked["pgd"]) > 0


def test_autoattack_runs_on_the_undecided_points_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Certified radii scaled down to 70% of the exact margins leave points between certificate and
    bound: exactly those, and no certified one, reach AutoAttack; the figures equal the attack-only run."""
    model, x, y = linear_problem()
    exact = torch.as_tensor(exact_margins(model, x, y))
    calls: list[torch.Tensor] = []
    real = ATTACKS.get("autoattack")

    def counting(m: nn.Module, xs: torch.Tensor, ys: torch.Tensor, e: float, s: Any) -> Any:
        calls.append(xs.flatten(1))
        return real(m, xs, ys, e, s)

    monkeypatch.setitem(ATTACKS._items, "autoattack", counting)
    monkeypatch.setattr(
        evaluate_module, "certify", lambda *a: Certificates(0.7 * exact, {"estimator": "test"})
    )
    kw = {"margin_upper": exact * 1.3, **FAST_AA}
    res = robust_accuracy(model, x, y, EPS, **kw)
    flat = x.flatten(1)
    assert [len(c) for c in calls] == res.decided["attacked"] == res.attacked["autoattack"]
    for j, e in enumerate(EPS):
        certified = flat[(exact * 0.7 >= e) & torch.tensor(res.points["correct"])]
        assert not (calls[j][:, None] == certified[None]).all(-1).any()  # no certified point attacked
        undecided = (exact * 0.7 < e) & (exact * 1.3 > e) & (exact > 0)
        assert len(calls[j]) == int(undecided.sum()) > 0
    monkeypatch.undo()
    off = robust_accuracy(model, x, y, EPS, certify="off", **kw)
    assert res.worst_case == off.worst_case
    assert sum(res.attacked["autoattack"]) < sum(off.attacked["autoattack"])


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=data.input_shape, widths=(32,))
    cfg = TrainConfig(epochs=8, batch_size=64, device="cpu", progress=False, threads=1)
    fit(model, data.x, data.y, cfg, lr=0.1, seed=0, device=torch.device("cpu"))
    test = load_dataset("digits", "test", n=60, seed=1)
    return model.eval(), test.x, test.y


def test_digits_mlp_band_and_the_same_robust_accuracy_as_attacks_alone(digits_mlp) -> None:
    model, x, y = digits_mlp
    eps = [0.25, 0.5, 0.75]
    res = robust_accuracy(model, x, y, eps, **FAST_AA)
    off = robust_accuracy(model, x, y, eps, certify="off", **FAST_AA)
    assert_band(res)
    assert res.certified[0] > 0.3 and res.certified[1] < res.worst_case[1]  # not vacuous either way
    assert all(a <= b for a, b in zip(res.worst_case, off.worst_case, strict=True))
    assert sum(res.attacked["autoattack"]) < sum(off.attacked["autoattack"])
    # every certified radius lies below the DDN bound of the same point
    lower, upper = res.margin_lower(), res.margin_upper()
    correct = np.asarray(res.points["correct"])
    assert (lower[correct] <= upper[correct]).all()


def test_a_lying_certifier_is_a_soundness_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = linear_problem(n=30)
    exact = torch.as_tensor(exact_margins(model, x, y))
    monkeypatch.setattr(evaluate_module, "certify", lambda *a: Certificates(3 * exact, {"estimator": "liar"}))
    with pytest.raises(SoundnessError, match="below their certified radius"):
        robust_accuracy(model, x, y, EPS, attacks=("pgd",), steps=5)  # DDN bounds contradict it
    # given bounds below sound certificates (the exact margins): a warning, since they may be over R^d
    monkeypatch.setattr(evaluate_module, "certify", lambda *a: Certificates(exact, {"estimator": "exact"}))
    given = robust_accuracy(model, x, y, EPS, attacks=("pgd",), steps=5, margin_upper=0.5 * exact)
    assert any("certificates win" in w for w in given.warnings)
    assert_band(given)
    with pytest.raises(SoundnessError, match="inside|certified robust up to"):
        check_broken(exact.abs() + 1, torch.tensor([3]), torch.tensor([0.5], dtype=torch.float64), 1.0)


def test_auto_goes_without_certificates_on_unsupported_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = 0.3 + 0.4 * torch.rand(10, *SHAPE)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = robust_accuracy(model, x, y, [0.1], attacks=("pgd",), steps=5)
    assert res.certified is None and res.certifier is None and res.decided is not None
    (note,) = res.notes
    assert note.startswith("no certificates: crown cannot bound this model") and "\n" not in note
    with pytest.raises(ConfigError):
        robust_accuracy(model, x, y, [0.1], attacks=("pgd",), steps=5, certify="crown")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"certify": "ddn"}, "not a certified lower bound"),
        ({"certify": "nope"}, "unknown estimator"),
        ({"certify": "crown", "certify_params": {"rtol": 5}}, "rtol"),
        ({"certify": "off", "certify_params": {"rtol": 0.1}}, "certify is off"),
    ],
)
def test_bad_certify_settings_are_one_line_errors(kwargs: dict, match: str) -> None:
    model, x, y = linear_problem(n=4)
    with pytest.raises(ConfigError, match=match):
        robust_accuracy(model, x, y, [0.1], **kwargs)


class _OutOfTime:
    """An exact certifier whose solver ran out of time: its values are upper bounds, not certificates."""

    kind, domain = MarginKind.EXACT, "box"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: object) -> torch.Tensor:
        return torch.ones(len(x), dtype=torch.float64)

    def result_kind(self) -> MarginKind:
        return MarginKind.UPPER


def test_an_exact_certifier_that_ran_out_of_time_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = linear_problem(n=10)
    monkeypatch.setattr(certify_module, "build_estimator", lambda name, **kw: _OutOfTime())
    with pytest.raises(ConfigError, match="gave a upper bound on some point, not a certificate"):
        robust_accuracy(model, x, y, [0.1], attacks=("pgd",), steps=5, certify="crown")


def _old_file(res: RobustnessResult) -> dict:
    """``res`` as a robustness.json written before certificates: no certified fields at all."""
    old = res.to_dict()
    for key in ("certified", "certifier", "decided", "notes"):
        del old[key]
    del old["points"]["margin_lower"]
    return old


def test_old_files_load_and_tables_show_the_certified_column(tmp_path: Path) -> None:
    model, x, y = linear_problem(n=20)
    new = robust_accuracy(model, x, y, [0.1], attacks=("pgd",), steps=5)
    for name, raw in (("new", new.to_dict()), ("old", _old_file(new))):
        sub = tmp_path / name
        sub.mkdir()
        (sub / "robustness.json").write_text(json.dumps(raw))
        (sub / "config.json").write_text(json.dumps({"kind": "train", "tracking": {"estimators": ["fo"]}}))
        (sub / "summary.json").write_text(json.dumps({"clean_accuracy": {"test": 0.9}}))
    old = read_robustness(tmp_path / "old")
    assert old.certified is None and old.margin_lower() is None and old.worst_case == new.worst_case
    assert HEADLINE.index("certified@ref") == HEADLINE.index("worst@ref") - 1  # the band, side by side
    for name, want in (("new", new.certified[0]), ("old", None)):
        row = seed_metrics(tmp_path / name) | {"eps_ref": 0.1, "base": "b", "recipe": "r"}
        line = dict(zip(HEADLINE, _headline(row), strict=False))
        assert line["certified@ref"] == want and line["worst@ref"] == new.worst_case[0]


def test_cli_prints_the_band_and_can_turn_certificates_off(
    digits_mlp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _, _ = digits_mlp
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    argv = ["robustness", "--model", "mlp", "--option", "widths=[32]", "--weights", str(weights), "--data",
            "digits", "--n", "20", "--eps", "0.5", "--attacks", "pgd", "--steps", "5"]  # fmt: skip
    assert main([*argv, "--certify-param", "domain=rd", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "certificates by crown (rd domain)" in out and "eps=0.5: certified " in out and "<= robust" in out
    saved = read_robustness(tmp_path / "a")
    assert saved.certified is not None and saved.settings["certify"] == "auto"
    assert saved.certifier is not None and saved.certifier["params"] == {"domain": "rd"}
    assert main([*argv, "--certify", "off", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "certified" not in out and read_robustness(tmp_path / "b").certified is None
