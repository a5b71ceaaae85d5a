"""``marginlab margins`` and ``marginlab robustness`` on a model trained here and saved as a state_dict,
checked against the Python API and closed forms; bad inputs give one-line errors and write nothing."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marginlab.base.errors import ConfigError
from marginlab.cli import main
from marginlab.core.linear import linear_margins, minimal_adversarial
from marginlab.data import load_dataset, load_points
from marginlab.estimators import estimate_margins
from marginlab.nets.models import build_model
from marginlab.robustness import robust_accuracy
from marginlab.robustness.attacks import parse_eps
from marginlab.robustness.evaluate import margin_upper_from_points
from marginlab.training.loop import TrainConfig, fit

WIDTH = ["--option", "widths=[16]"]


def _squeeze(x: torch.Tensor) -> torch.Tensor:
    """Pixels into [0.25, 0.75]: minimal perturbations of a linear model then stay inside the box."""
    return 0.25 + 0.5 * x


def _train(name: str, squeeze: bool = False, **options: object) -> torch.nn.Module:
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, input_shape=data.input_shape, **options)
    cfg = TrainConfig(epochs=8, batch_size=64, device="cpu", progress=False, threads=1)
    x = _squeeze(data.x) if squeeze else data.x
    fit(model, x, data.y, cfg, lr=0.1, seed=0, device=torch.device("cpu"))
    return model.eval()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = _train("mlp", widths=(16,))
    path = tmp_path_factory.mktemp("w") / "mlp.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def test_margins_command_matches_the_python_api(mlp, tmp_path, capsys):
    model, weights = mlp
    out = tmp_path / "m"
    argv = ["margins", "--model", "mlp", *WIDTH, "--weights", str(weights), "--data", "digits", "--n", "40",
            "--seed", "3", "--estimators", "first-order,deepfool,ddn,best", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cols = _read_csv(out / "margins.csv")
    # the headers state the domain: first-order estimates the R^d margin, the attacks search the box
    assert list(cols) == [
        "index",
        "label",
        "prediction",
        "first-order[rd]",
        "deepfool[box]",
        "ddn[box]",
        "best[box]",
    ]
    cols = {k.partition("[")[0]: v for k, v in cols.items()}
    # the same seeded points as load_dataset, with their indices in the split
    ref = load_dataset("digits", "test", n=40, seed=3)
    full = load_dataset("digits", "test")
    idx = cols["index"].astype(int)
    assert np.array_equal(full.y[idx].numpy(), ref.y.numpy()) and np.array_equal(cols["label"], ref.y.numpy())
    with torch.no_grad():
        pred = model(ref.x).argmax(1).numpy()
    assert np.array_equal(cols["prediction"], pred)
    api = estimate_margins(model, ref.x, ref.y, ["first-order"])["first-order"].values.numpy()
    np.testing.assert_allclose(cols["first-order"], api, rtol=1e-6)
    for name in ("first-order", "deepfool", "ddn", "best"):  # the sign says whether the point is correct
        assert np.array_equal(cols[name] > 0, pred == ref.y.numpy())
    # best = the per-point tightest of the attacks named beside it
    tight = np.where(np.abs(cols["deepfool"]) < np.abs(cols["ddn"]), cols["deepfool"], cols["ddn"])
    np.testing.assert_allclose(cols["best"], tight)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 40 and summary["accuracy"] == pytest.approx((pred == ref.y.numpy()).mean())
    est = summary["estimators"]
    assert est["first-order"]["kind"] == "estimate" and est["best"]["kind"] == "upper bound"
    assert est["ddn"]["median"] == pytest.approx(np.median(cols["ddn"]))
    assert est["ddn"]["non_finite"] == int((~np.isfinite(cols["ddn"])).sum())
    # best reuses the attacks that have their own columns: combining them costs it next to nothing
    assert est["best"]["seconds"] < 0.05 < est["deepfool"]["seconds"] + est["ddn"]["seconds"]
    assert est["first-order"]["domain"] == "rd" and est["best"]["domain"] == summary["domain"] == "box"
    assert "wrote" in capsys.readouterr().out


def test_margins_parquet(mlp, tmp_path, monkeypatch, capsys):
    _, weights = mlp
    out = tmp_path / "m"
    argv = ["margins", "--model", "mlp", *WIDTH, "--weights", str(weights), "--data", "digits", "--n", "10",
            "--estimators", "first-order", "--format", "parquet", "--out", str(out)]  # fmt: skip
    try:
        import pandas as pd
        import pyarrow  # noqa: F401
    except ImportError:
        pd = None
    if pd is not None:
        assert main(argv) == 0
        frame = pd.read_parquet(out / "margins.parquet")
        assert list(frame.columns) == ["index", "label", "prediction", "first-order[rd]"] and len(frame) == 10
        (out / "margins.parquet").unlink()
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails: the one-line error suggests .csv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "csv" in err and not (out / "margins.parquet").exists()


def test_robustness_command_linf_takes_the_default_bound_of_its_norm(mlp, tmp_path):
    # --bound left out means "auto": FMN for Linf (DDN has no Linf mode; the default was once "ddn")
    _, weights = mlp
    out = tmp_path / "rob"
    argv = ["robustness", "--model", "mlp", *WIDTH, "--weights", str(weights), "--data", "digits",
            "--n", "10", "--eps", "0.05", "--norm", "Linf", "--attacks", "pgd", "--steps", "5",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads((out / "robustness.json").read_text())["settings"]
    assert settings["norm"] == "Linf" and settings["bound"] == "fmn"


def test_robustness_command(mlp, tmp_path, capsys):
    model, weights = mlp
    out = tmp_path / "rob"
    argv = ["robustness", "--model", "mlp", *WIDTH, "--weights", str(weights), "--data", "digits",
            "--n", "60", "--eps", "0.5,0.25", "--attacks", "pgd", "--steps", "20", "--step-size", "0.05",
            "--bound", "deepfool", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "robustness.json").read_text())
    assert (out / "robustness.png").stat().st_size > 1000
    assert res["eps"] == [0.25, 0.5] and res["n"] == 60 and res["model"] == "mlp"
    data, _ = load_points("digits", "test", n=60, seed=0)
    with torch.no_grad():
        correct = (model(data.x).argmax(1) == data.y).numpy()
    assert res["clean_accuracy"] == pytest.approx(correct.mean())
    upper = margin_upper_from_points(res["points"])
    for j, e in enumerate(res["eps"]):
        # the bound share, recomputed from the per-point bounds; the worst case never exceeds PGD or it
        assert res["bound_share"][j] == pytest.approx(np.mean(correct & (upper > e)))
        assert res["worst_case"][j] <= min(res["accuracy"]["pgd"][j], res["bound_share"][j]) + 1e-9
    assert res["worst_case"][1] <= res["worst_case"][0]  # larger balls: never more robust
    assert "eps=0.25" in capsys.readouterr().out


def test_evaluate_robustness_agrees_with_exact_linear_margins():
    """Against the closed form on a linear model: a point whose exact margin exceeds eps always survives
    (adversarial examples are verified), and a point whose closed-form minimal adversarial lies inside
    the image box with norm below eps is broken (DeepFool, exact up to its overshoot on linear models).
    So the reported worst case is the share of points with exact margin > eps, up to the few points
    within the overshoot of eps."""
    model = _train("lr", squeeze=True)
    data, _ = load_points("digits", "test", n=120, seed=1)
    x, y = _squeeze(data.x), data.y
    w, b = model.head.weight.detach(), model.head.bias.detach()
    exact = linear_margins(w, b, x, y, p=2).double().numpy()
    adv = minimal_adversarial(w, b, x, y, p=2, overshoot=1e-3)
    in_box = ((adv.x >= 0) & (adv.x <= 1)).flatten(1).all(1).numpy()
    eps = [0.1, 0.25, 0.4]
    res = robust_accuracy(model, x, y, eps, attacks=("pgd",), bound="deepfool", steps=40, step_size=0.05)
    robust = np.asarray(res.points["robust"])
    for j, e in enumerate(eps):
        assert robust[j][exact > e * (1 + 1e-4)].all()
        breakable = (exact > 0) & (exact < e / 1.05) & in_box  # DeepFool overshoots by 2%
        assert breakable.sum() >= 3 and not robust[j][breakable].any()
        sure = np.mean(exact > e * (1 + 1e-4))  # robust for certain
        possible = np.mean((exact >= e / 1.05) | (~in_box & (exact > 0)))  # not broken by DeepFool
        assert sure <= res.worst_case[j] <= possible and possible - sure <= 0.05


@pytest.mark.parametrize("bad", ["", "a,1", "nan", "inf", "-1", "1,,"])
def test_parse_eps(bad):
    assert parse_eps("2, 0.5,1,1") == [0.5, 1.0, 2.0]
    with pytest.raises(ConfigError, match="eps"):
        parse_eps(bad)


def _bad_weights(tmp_path: Path, mlp_weights: Path) -> dict[str, Path]:
    state = torch.load(mlp_weights, weights_only=True)
    nan = {k: v.clone() for k, v in state.items()}
    nan["head.bias"][0] = math.nan
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    return {"nan": tmp_path / "nan.pt", "junk": tmp_path / "junk.pt"}


CASES = {
    "unknown model": (["--model", "nope"], "unknown model"),
    "wrong architecture": (["--option", "widths=[32]"], "does not fit"),
    "other architecture": (["--model", "lr"], "does not fit"),
    "missing weights": (["--weights", "{tmp}/missing.pt"], "not found"),
    "unreadable weights": (["--weights", "{junk}"], "cannot read"),
    "nan weights": (["--weights", "{nan}"], "NaN"),
    "too many points": (["--n", "100000"], "only"),
    "zero points": (["--n", "0"], "positive"),
    "unknown dataset": (["--data", "imagenet"], "imagenet"),
}
ROBUSTNESS_CASES = {
    "bad eps": (["--eps", "0.5,x"], "eps"),
    "nan eps": (["--eps", "nan"], "eps"),
    "negative eps": (["--eps", "-1"], "eps"),
    "unknown attack": (["--attacks", "pgd,cw"], "attack"),
    "unknown norm": (["--norm", "L3"], "norm"),
    "bound not an attack": (["--bound", "first-order"], "bound"),
}
MARGINS_CASES = {
    "unknown estimator": (["--estimators", "first-order,magic"], "estimator"),
    "out is a file": (["--out", "{tmp}/nan.pt"], "not a directory"),
    "bad norm": (["--norm", "3"], "norm"),
    "bad param": (["--param", "nope.steps=3"], "param"),
}


def _argv(command: str, extra: list[str], out: Path, weights: Path) -> list[str]:
    base = {"--model": "mlp", "--weights": str(weights), "--data": "digits", "--n": "20"}
    if command == "robustness":
        base |= {"--eps": "0.5", "--attacks": "pgd", "--steps": "2", "--out": str(out)}
    else:
        base |= {"--estimators": "first-order", "--out": str(out)}
    opts = dict(zip(extra[::2], extra[1::2], strict=True))
    argv = [command]
    for k, v in (base | opts).items():
        argv += [k, v]
    return argv + ([] if "--model" in opts else WIDTH if "--option" not in opts else [])


@pytest.mark.parametrize(
    ("command", "case"),
    [(c, k) for c in ("robustness", "margins") for k in CASES]
    + [("robustness", k) for k in ROBUSTNESS_CASES]
    + [("margins", k) for k in MARGINS_CASES],
)
def test_bad_input_is_one_line_and_writes_nothing(command, case, mlp, tmp_path, capsys):
    extra, words = {**CASES, **ROBUSTNESS_CASES, **MARGINS_CASES}[case]
    paths = _bad_weights(tmp_path, mlp[1])
    extra = [e.format(tmp=tmp_path, **paths) for e in extra]
    out = tmp_path / ("rob" if command == "robustness" else "m")
    argv = _argv(command, extra, out, mlp[1])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("marginlab: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert words.lower() in err.lower()
    written = {p.name for p in tmp_path.iterdir()} - {"nan.pt", "junk.pt"}
    assert written == set(), written
