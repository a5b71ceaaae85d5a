"""The training-objective plumbing: recipes name an objective and its terms, ``regularizer.params`` are
checked and resolved into config.json, the loop calls the objective with the right step information and
logs its terms, and checkpoints written before objectives existed still resume bit for bit."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import Crash, crash_when_saving_epoch, one_line_error, tiny_train_toml, write_text
from marginlab.base.errors import ConfigError
from marginlab.base.fsio import read_jsonl
from marginlab.cli import main
from marginlab.data import load_dataset
from marginlab.experiments import build_config
from marginlab.experiments.compare_config import BaseConfig, Config, subrun_config
from marginlab.lab.runs import RunDir
from marginlab.nets.models import build_model
from marginlab.training.checkpoint import load_checkpoint, save_checkpoint
from marginlab.training.loop import TrainConfig, fit
from marginlab.training.objectives import BuildContext, CrossEntropy, Objective, StepInfo, StepLoss
from marginlab.training.recipes import (
    RECIPES,
    RegularizerConfig,
    build_objective,
    reference_lr,
    resolve_config,
)
from marginlab.training.regularizers import AverageMargin, Orthogonality

CPU = torch.device("cpu")


def test_recipes_name_registered_objectives_and_reference_params():
    for name in RECIPES:  # every recipe builds with its reference values on MNIST
        obj = build_objective(RegularizerConfig(recipe=name), "mnist-mlp", "mnist", seed=0)
        assert obj.name == RECIPES[name].objective
    assert isinstance(build_objective(RegularizerConfig(recipe="constraint"), "mnist-mlp"), CrossEntropy)
    mnist = resolve_config(RegularizerConfig(recipe="pgd-at"), "mnist-cnn", "mnist").params
    assert mnist == {"norm": "Linf", "eps": 0.3, "steps": 40, "step_size": 0.01, "random_start": True}
    cifar = resolve_config(RegularizerConfig(recipe="trades", params={"eps": 0.02}), "cifar-cnn", "cifar10")
    ref = {"norm": "Linf", "eps": 0.02, "steps": 10, "random_start": True, "beta": 6.0}
    assert {k: v for k, v in cifar.params.items() if k != "step_size"} == ref
    assert cifar.params["step_size"] == pytest.approx(0.007 * 0.02 / 0.031)  # the reference's step / eps
    l2 = resolve_config(RegularizerConfig(recipe="pgd-at", params={"norm": 2}), "mnist-mlp", "mnist")
    assert l2.params["norm"] == "L2" and l2.params["eps"] == 2.0
    assert resolve_config(l2, "mnist-mlp", "mnist") == l2  # resolving twice changes nothing
    assert resolve_config(RegularizerConfig(recipe="regularized"), "mnist-mlp").params == {}
    assert reference_lr("pgd-at") == reference_lr("trades") == 0.01 and reference_lr("regularized") == 0.002


@pytest.mark.parametrize(
    "recipe, params, needle",
    [
        ("pgd-at", {"epz": 0.1}, "unknown parameter 'epz' of recipe 'pgd-at'; known: norm, eps, steps"),
        ("trades", {"norm": "L1"}, "norm must be L2 or Linf"),
        ("pgd-at", {"steps": 2.5}, "steps must be an integer >= 0"),
        ("pgd-at", {"step_size": -1}, "step_size must be a finite number >= 0"),
        ("trades", {"beta": float("nan")}, "beta must be a finite number >= 0"),
        ("standard", {"eps": 0.1}, "takes no regularizer.params"),
    ],
)
def test_bad_params_are_one_line_config_errors(recipe, params, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_config(RegularizerConfig(recipe=recipe, params=params), "mnist-mlp", "mnist")


def test_bad_params_in_a_config_file_stop_the_cli_before_training(tmp_path: Path, capsys) -> None:
    text = tiny_train_toml() + '[regularizer]\nrecipe = "pgd-at"\n[regularizer.params]\neps = 0.1\nepz = 1\n'
    code = main(["run", str(write_text(tmp_path / "c.toml", text)), "--out", str(tmp_path / "r")])
    assert "unknown parameter 'epz'" in one_line_error(code, capsys.readouterr().err)
    assert not (tmp_path / "r").exists()
    with pytest.raises(
        ConfigError, match="no reference parameters for dataset 'digits'; set steps, step_size"
    ):
        resolve_config(RegularizerConfig(recipe="pgd-at", params={"eps": 0.1}), "mlp", "digits")


class _Recorder(Objective):
    """Clean cross-entropy plus one logged term (0.5 · CE); records what the loop passes."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[StepInfo, bool, int]] = []

    @classmethod
    def build(cls, params: Mapping[str, Any], ctx: BuildContext) -> _Recorder:
        return cls()

    def term_names(self) -> tuple[str, ...]:
        return ("half-ce",)

    def __call__(self, net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, at: StepInfo) -> StepLoss:
        self.calls.append((at, model.training, len(y)))
        _, logits = net(x)
        ce = F.cross_entropy(logits, y)
        return StepLoss(1.5 * ce, ce, logits, {"half-ce": 0.5 * ce})


def test_loop_calls_the_objective_with_step_info_and_logs_its_terms():
    ds = load_dataset("digits", "train", n=70, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), widths=(8,))
    rec = _Recorder()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", progress=False, threads=1)
    records = fit(model, ds.x, ds.y, cfg, lr=0.05, seed=0, device=CPU, objective=rec)
    assert [(a.epoch, a.step, a.steps_per_epoch, a.epochs) for a, _, _ in rec.calls] == [
        (e, 3 * e + i, 3, 2) for e in range(2) for i in range(3)
    ]
    assert all(training for _, training, _ in rec.calls) and [n for *_, n in rec.calls][:3] == [32, 32, 6]
    last = records[-1]
    assert last["regularizers_epoch"]["half-ce"] == pytest.approx(0.5 * last["train_loss_epoch"], rel=1e-6)
    assert last["train_objective_epoch"] == pytest.approx(1.5 * last["train_loss_epoch"], rel=1e-6)
    with pytest.raises(ValueError, match="regularizers to the objective"):
        fit(
            model,
            ds.x,
            ds.y,
            cfg,
            lr=0.05,
            seed=0,
            device=CPU,
            objective=rec,
            regularizers=[AverageMargin(0.1, 1.0)],
        )


def _fit(rd: RunDir, *, resume: bool = False) -> None:
    """Two epochs of a stateful recipe: orthogonality every 3rd step with probes (a step counter and a
    probe generator that resume must restore)."""
    ds = load_dataset("digits", "train", n=96, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), widths=(8,))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", progress=False, threads=1)
    regs = [Orthogonality(1e-2, every=3, probes=2, seed=0)]
    fit(model, ds.x, ds.y, cfg, lr=0.05, seed=0, device=CPU, regularizers=regs, rd=rd, resume=resume)


def test_checkpoint_of_the_old_layout_resumes_bit_for_bit(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint as the loop wrote it before objectives (loss-term states under extra.regularizers,
    no objective states) resumes into the cross-entropy objective exactly."""
    ref = RunDir.create(tmp_path / "ref", {"kind": "x"})
    _fit(ref)
    restore = crash_when_saving_epoch(monkeypatch, 2)
    run = RunDir.create(tmp_path / "old", {"kind": "x"})
    with pytest.raises(Crash):
        _fit(run)
    restore()
    state = load_checkpoint(run.checkpoint)
    assert state.objective is not None and state.regularizers is None
    (own,) = state.objective
    state.regularizers, state.objective = own["regularizers"], None  # the old layout
    assert state.regularizers[0]["step"] > 0  # the term's state matters
    save_checkpoint(run.checkpoint, state)
    assert "objective" not in torch.load(run.checkpoint, weights_only=True)["extra"]
    _fit(run, resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(read_jsonl(run.path / "metrics.jsonl")) == strip(read_jsonl(ref.path / "metrics.jsonl"))
    wa, wb = load_checkpoint(ref.checkpoint).model, load_checkpoint(run.checkpoint).model
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


TRAIN = {
    "kind": "train",
    "data": {"dataset": "digits", "n_train": 100},
    "model": {"name": "mlp", "options": {"widths": [8]}},
    "train": {"epochs": 1, "device": "cpu", "progress": False},
    "regularizer": {"beta": 1e-3},
}


def test_compare_passes_each_recipe_its_params():
    base = BaseConfig(name="d", config=copy.deepcopy(TRAIN), eps=1.0)
    params = {"eps": 0.2, "steps": 2, "step_size": 0.1}
    cfg = Config(bases=(base,), recipes=("constraint", "pgd-at"), params={"pgd-at": params})
    assert subrun_config(base, "pgd-at", 0, cfg.params["pgd-at"])["regularizer"]["params"] == params
    assert "params" not in subrun_config(base, "constraint", 0)["regularizer"]
    _, built = build_config(subrun_config(base, "pgd-at", 0, params))
    assert getattr(built, "regularizer").params == {**params, "norm": "Linf", "random_start": True}  # noqa: B009
    bad = BaseConfig(
        name="b", config={**copy.deepcopy(TRAIN), "regularizer": {"params": {"eps": 0.1}}}, eps=1.0
    )
    with pytest.raises(ConfigError, match="base 'b': regularizer.params would apply to every recipe"):
        subrun_config(bad, "pgd-at", 0)
    with pytest.raises(ConfigError, match="params.trades: 'trades' is not one of the recipes"):
        Config(bases=(base,), recipes=("pgd-at",), params={"pgd-at": params, "trades": {}})
    with pytest.raises(ConfigError, match="recipe 'pgd-at'.*set steps, step_size"):
        Config(bases=(base,), recipes=("pgd-at",), params={"pgd-at": {"eps": 0.1}})


def test_grad_clip_rescales_each_step_to_the_given_norm():
    """One full-batch SGD step without momentum: w1 = w0 - lr * g * min(1, c / ||g||), g the gradient of
    the mean cross-entropy over every parameter (computed here independently of the loop)."""
    ds = load_dataset("digits", "train", n=40, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), widths=(16,))
    start = copy.deepcopy(model)
    clip, lr = 0.02, 0.5
    cfg = TrainConfig(
        epochs=1, batch_size=40, lr=lr, momentum=0.0, nesterov=False, device="cpu", progress=False,
        threads=1, grad_clip=clip,
    )  # fmt: skip
    fit(model, ds.x, ds.y, cfg, lr=lr, seed=0, device=CPU)
    loss = F.cross_entropy(start(ds.x), ds.y)
    grads = torch.autograd.grad(loss, list(start.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    assert norm > 10 * clip  # the clip is active
    for w1, w0, g in zip(model.parameters(), start.parameters(), grads, strict=True):
        torch.testing.assert_close(w1, w0 - lr * g * (clip / norm), rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="train.grad_clip must be a finite number > 0"):
        TrainConfig(grad_clip=0.0)
