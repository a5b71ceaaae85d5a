"""The logreg-gd experiment: the smoothness constant, the GD step, convergence to the SVM, a tiny run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from marginlab.base.errors import ConfigError
from marginlab.core.logistic import LogisticGD, smoothness_constant
from marginlab.experiments import logreg_gd, resume_experiment, run_experiment
from marginlab.experiments.logreg_gd import Config, record_epochs, snapshot_epochs
from marginlab.experiments.logreg_records import LogregRecord, LogregSummary, SplitStats


def _mean_logistic_loss(v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference loss of v = (w, b): mean log(1 + exp(-y (w·x + b)))."""
    return torch.nn.functional.softplus(-y * (x @ v[:-1] + v[-1])).mean()


def _random_problem(n: int = 40, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(n, d, generator=gen).double()
    y = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    return x, y


@pytest.mark.parametrize("shape", [(40, 6), (5, 12)], ids=["N>D", "N<D"])
def test_smoothness_constant_is_the_largest_hessian_eigenvalue(shape: tuple[int, int]) -> None:
    x, y = _random_problem(*shape)
    big_l = smoothness_constant(x)
    # Second method: the autograd Hessian. At (w, b) = 0 every sigma(1 - sigma) is exactly 1/4, so the
    # Hessian's top eigenvalue *is* L; elsewhere it can only be smaller.
    hess0 = torch.autograd.functional.hessian(
        lambda v: _mean_logistic_loss(v, x, y), torch.zeros(shape[1] + 1).double()
    )
    assert math.isclose(float(torch.linalg.eigvalsh(hess0)[-1]), big_l, rel_tol=1e-10)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(shape[1] + 1, generator=gen, dtype=torch.float64)
        hess = torch.autograd.functional.hessian(lambda v: _mean_logistic_loss(v, x, y), v)
        assert float(torch.linalg.eigvalsh(hess)[-1]) <= big_l * (1 + 1e-12)


def test_gd_step_is_below_two_over_l_and_descends() -> None:
    x, y = _random_problem()
    gd = LogisticGD(x, y, torch.zeros(x.shape[1]).double(), 0.0, step_fraction=0.99)
    assert gd.eta * gd.L == pytest.approx(1.98) and gd.eta < 2 / smoothness_constant(x)
    # One step by hand: v1 = v0 - eta * grad at v0 (autograd), the independent reference.
    v0 = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_mean_logistic_loss(v0, x, y), v0)
    gd.step()
    w, b = gd.weights()
    torch.testing.assert_close(
        torch.cat([w, torch.tensor([b], dtype=torch.float64)]), -gd.eta * grad, rtol=1e-12, atol=1e-14
    )
    # eta < 2/L guarantees monotone descent (descent lemma).
    losses = [gd.loss()]
    for _ in range(200):
        gd.step()
        losses.append(gd.loss())
    assert all(b <= a + 1e-15 for a, b in zip(losses, losses[1:], strict=False))


@pytest.mark.parametrize("fraction", [0.0, -0.1, float("nan"), float("inf")])
def test_step_fraction_must_be_positive_and_finite(fraction: float) -> None:
    with pytest.raises(ConfigError, match="step_fraction"):
        Config(step_fraction=fraction)
    assert Config(step_fraction=50.0).step_fraction == 50.0  # above 2/L: allowed (with a warning)


def test_normalized_step_is_gradient_over_loss() -> None:
    x, y = _random_problem()
    v0 = torch.full((x.shape[1] + 1,), 0.05, dtype=torch.float64, requires_grad=True)
    gd = LogisticGD(x, y, v0[:-1].detach(), 0.05, step_fraction=0.7, normalized=True)
    loss = _mean_logistic_loss(v0, x, y)
    (grad,) = torch.autograd.grad(loss, v0)  # the independent reference: autograd
    gd.step()
    w, b = gd.weights()
    expected = v0.detach() - gd.eta * grad / loss.detach()
    torch.testing.assert_close(
        torch.cat([w, torch.tensor([b], dtype=torch.float64)]), expected, rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize(
    ("fraction", "normalized", "steps", "cos"), [(1.5, False, 20000, 0.98), (0.5, True, 3000, 0.999)]
)
def test_large_and_normalized_steps_converge_to_the_svm(
    fraction: float, normalized: bool, steps: int, cos: float
) -> None:
    """Beyond 2/L, GD still converges in direction to the SVM; normalised GD gets there in few steps
    and stays finite after every sigmoid has underflowed (its update is computed in log space)."""
    from marginlab.core.svm import direction_cosine, hard_margin_svm

    x, y = _two_d_separable()
    svm = hard_margin_svm(x, y)
    gd = LogisticGD(x, y, torch.zeros(2).double(), 0.0, step_fraction=fraction, normalized=normalized)
    gd.step(steps)
    w, b = gd.weights()
    assert torch.isfinite(w).all() and math.isfinite(b)
    assert direction_cosine(w, b, torch.as_tensor(svm.w, dtype=torch.float64), float(svm.b)) > cos


def test_constant_zero_pixels_keep_their_initial_weight() -> None:
    x, y = _random_problem(d=5)
    x[:, 2] = 0.0
    w0 = torch.full((5,), 0.3, dtype=torch.float64)
    gd = LogisticGD(x, y, w0, 0.1, step_fraction=0.5)
    gd.step(20)
    w, _ = gd.weights()
    assert w[2] == 0.3 and not torch.equal(w, w0)


def _two_d_separable() -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric (x -> -x, y -> -y) so b = 0; the SVM is w ∝ (1, 0) with margin 2 (support (±2, 0)).

    The +1 cluster near (4, 3) pulls early GD off the axis, so the cosine must really climb.
    """
    pos = torch.tensor([[2.0, 0.0], [4.0, 3.0], [4.5, 2.5], [3.5, 3.5]], dtype=torch.float64)
    return torch.cat([pos, -pos]), torch.cat([torch.ones(4), -torch.ones(4)]).double()


def test_gd_converges_in_direction_to_the_hard_margin_svm() -> None:
    from marginlab.core.svm import direction_cosine, hard_margin_svm

    x, y = _two_d_separable()
    svm = hard_margin_svm(x, y)
    w_svm = torch.as_tensor(svm.w, dtype=torch.float64)
    assert svm.margin == pytest.approx(2.0, rel=1e-3)  # the hand solution ...
    assert float(w_svm[0]) / float(w_svm.norm()) == pytest.approx(1.0, abs=1e-3)  # ... and its direction
    gd = LogisticGD(x, y, torch.zeros(2).double(), 0.0, step_fraction=0.99)
    cosines, done = [], 0
    for t in np.unique(np.logspace(0, 4.3, 12).astype(int)):
        gd.step(int(t) - done)
        done = int(t)
        w, b = gd.weights()
        cosines.append(direction_cosine(w, b, w_svm, float(svm.b)))
    assert cosines[0] < 0.9  # it starts far from the SVM direction
    assert all(b >= a - 1e-12 for a, b in zip(cosines[3:], cosines[4:], strict=False))  # then keeps rising
    assert cosines[-1] > 0.99


def _gd_cosines(x: torch.Tensor, y: torch.Tensor, svms: list) -> list[list[float]]:
    """Cosine of GD's (w, b) with each SVM's (w, b), at 12 log-spaced steps up to 20,000."""
    from marginlab.core.svm import direction_cosine

    gd = LogisticGD(x, y, torch.zeros(x.shape[1]).double(), 0.0, step_fraction=0.99)
    out, done = [], 0
    for t in np.unique(np.logspace(0, 4.3, 12).astype(int)):
        gd.step(int(t) - done)
        done = int(t)
        w, b = gd.weights()
        out.append([direction_cosine(w, b, s.w, s.b) for s in svms])
    return out


def test_with_a_bias_gd_goes_to_the_svm_whose_bias_is_penalised() -> None:
    """Shifted off the origin, the two SVMs differ (cosine 0.969) and GD follows the bias-penalised one."""
    from marginlab.core.svm import direction_cosine, hard_margin_svm

    x, y = _two_d_separable()
    x = x + torch.tensor([2.0, 1.0], dtype=torch.float64)
    free, reg = hard_margin_svm(x, y), hard_margin_svm(x, y, bias="regularized")
    assert direction_cosine(free.w, free.b, reg.w, reg.b) < 0.98
    cos = np.array(_gd_cosines(x, y, [reg, free]))
    assert cos[-1, 0] > 0.995 and np.all(np.diff(cos[:, 0]) > 0)
    assert cos[-1, 1] < 0.975  # the classical SVM is not where GD goes


def test_record_and_snapshot_schedules() -> None:
    rec = record_epochs(10_000, 50, 100)
    assert rec[:50] == list(range(1, 51)) and rec[-1] == 10_000
    assert rec == sorted(set(rec)) and 120 <= len(rec) <= 160
    late = np.diff(np.log(rec[50:]))
    assert late.max() < 3 * late.mean()  # roughly log-spaced
    snaps = snapshot_epochs(rec, 4)
    assert len(snaps) == 4 and snaps[0] == 1 and snaps[-1] == 10_000 and set(snaps) <= set(rec)
    assert record_epochs(5, 50, 100) == [1, 2, 3, 4, 5]


def _tiny_config(**kw: object) -> dict:
    cfg = {
        "kind": "logreg-gd",
        "data": {"dataset": "digits:0,1"},
        "epochs": 400,
        "step_fraction": 0.99,
        "every_epoch_until": 10,
        "n_records": 20,
        "n_snapshots": 3,
    }
    cfg.update(kw)
    return cfg


def test_end_to_end_on_digits(tmp_path) -> None:
    out = run_experiment(_tiny_config(), tmp_path / "run")
    for name in ("config.json", "metrics.jsonl", "summary.json", "svm.npz", "adv_images.npz"):
        assert (out / name).is_file(), name
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert figures == {"margins.png", "cosine.png", "loss_error.png", "histograms.png", "adversarial.png"}
    assert len(list((out / "margins").glob("epoch-*.npz"))) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "logreg-gd" and summary["eta_times_L"] == pytest.approx(1.98)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == record_epochs(400, 10, 20)
    # digits 0-vs-1 is separable and easy: the training set is separated and the trade-off shows.
    assert summary["train_error_last"] == 0.0 and summary["svm_margin"] > 0
    assert summary["train_min_margin_rises"] and summary["train_mean_margin_falls"]
    assert summary["cos_svm_last"] > summary["cos_svm_first"]
    assert summary["train_min_margin_last"] <= summary["svm_margin"] + 1e-9  # the SVM margin is the best
    # the files hold exactly the keys their TypedDicts declare, in the declared order (what JSON keeps)
    assert list(summary) == ["kind", *LogregSummary.__annotations__]
    for line in lines:
        record = json.loads(line)
        assert list(record) == list(LogregRecord.__annotations__)
        assert list(record["train"]) == list(record["test"]) == list(SplitStats.__annotations__)
        assert list(record["train"]["margin"]) == ["min", "mean", "max", "q10", "q25", "median", "q75", "q90"]


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(logreg_gd, "plot", lambda run_dir: [])  # figures are tested above; save time
    ref = run_experiment(_tiny_config(), tmp_path / "ref")
    real_step = LogisticGD.step
    calls = {"n": 0}

    def flaky_step(self: LogisticGD, n: int = 1) -> None:
        calls["n"] += 1
        if calls["n"] == 18:
            raise KeyboardInterrupt  # killed mid-run, after some records and checkpoints
        real_step(self, n)

    monkeypatch.setattr(logreg_gd.LogisticGD, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_tiny_config(), tmp_path / "cut")
    monkeypatch.setattr(logreg_gd.LogisticGD, "step", real_step)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resume_experiment(tmp_path / "cut")
    assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()
