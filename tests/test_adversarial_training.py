"""PGD adversarial training and TRADES: the inner PGD stays in the ball and the box and raises the loss,
TRADES' KL term is exactly zero without an attack and equals its definition with one, pgd-at with ε = 0
is standard training bit for bit, and a killed pgd-at run resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import Crash, crash_when_saving_epoch, tiny_train_toml, write_text
from marginlab.base.fsio import read_jsonl
from marginlab.cli import main
from marginlab.core.norms import Norm
from marginlab.data import load_dataset
from marginlab.lab.runs import RunDir
from marginlab.nets.models import build_model
from marginlab.training.adversarial import InnerPgd, PgdAt, Trades
from marginlab.training.checkpoint import load_checkpoint
from marginlab.training.loop import FeaturesAndLogits, TrainConfig, fit
from marginlab.training.objectives import Objective, StepInfo

CPU = torch.device("cpu")
AT = StepInfo(epoch=0, step=0, steps_per_epoch=1, epochs=1)
PARAMS = "eps = 0.1\nsteps = 3\nstep_size = 0.05\n"


def _mlp(seed: int = 0, side: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=10, input_shape=(1, side, side), widths=(16,))


def _batch(n: int = 24, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, side, side, generator=gen)
    x[:, :, 0] = 0.0  # pixels on the box's faces: the box constraint is active there
    x[:, :, -1] = 1.0
    return x, torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("norm, eps", [(Norm.Linf, 0.1), (Norm.L2, 0.8)])
def test_inner_pgd_stays_in_ball_and_box_and_raises_the_loss(norm, eps):
    model, (x, y) = _mlp(), _batch()
    attack = InnerPgd(norm, eps, steps=10, step_size=eps / 4)
    # a start far outside both the ball and the box is projected first
    start = x + 5 * eps * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    x_adv = attack.maximise(model, x, lambda z: F.cross_entropy(z, y, reduction="sum"), start)
    dist = torch.linalg.vector_norm((x_adv - x).flatten(1), ord=norm.p, dim=1)
    assert float(dist.max()) <= eps * (1 + 1e-5)
    assert float(dist.max()) > 0.5 * eps  # it did move
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert bool((adv > clean).all()), (adv - clean).min()


def test_trades_kl_is_zero_without_attack_and_its_definition_with_one():
    model, (x, y) = _mlp(), _batch()
    net = FeaturesAndLogits(model)
    off = Trades(InnerPgd(Norm.Linf, 0.1, steps=0, step_size=0.01), random_start=False, seed=0, beta=6.0)
    out = off(net, model, x, y, AT)
    assert out.terms["trades-kl"].item() == 0.0  # exactly: KL(p || p)
    assert torch.equal(out.objective, out.ce) and torch.equal(out.ce, F.cross_entropy(model(x), y))

    on = Trades(InnerPgd(Norm.Linf, 0.1, steps=5, step_size=0.03), random_start=True, seed=0, beta=6.0)
    out = on(net, model, x, y, AT)
    # the same noise and ascent again, then the KL by its definition: mean_i sum_k p_ik (log p_ik - log q_ik)
    again = Trades(on.attack, random_start=True, seed=0, beta=6.0)
    with torch.no_grad():
        target = F.log_softmax(model(x), 1)
    x_adv = again.attack.maximise(
        model,
        x,
        lambda z: F.kl_div(F.log_softmax(z, 1), target, reduction="sum", log_target=True),
        again.start(x),
    )
    p, logq = F.softmax(model(x), 1), F.log_softmax(model(x_adv), 1)
    kl = (p * (p.log() - logq)).sum(1).mean()
    assert out.terms["trades-kl"].item() > 0
    assert out.terms["trades-kl"].item() == pytest.approx(6.0 * kl.item(), rel=1e-5)
    assert out.objective.item() == pytest.approx((out.ce + out.terms["trades-kl"]).item(), rel=1e-6)


def test_pgd_at_with_zero_eps_is_standard_training_bit_for_bit():
    ds = load_dataset("digits", "train", n=96, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", progress=False, threads=1)
    std = _mlp()
    rec_std = fit(std, ds.x, ds.y, cfg, lr=0.05, seed=3, device=CPU)
    adv = _mlp()
    pgd = PgdAt(InnerPgd(Norm.Linf, 0.0, steps=3, step_size=0.1), random_start=True, seed=3)
    rec_adv = fit(adv, ds.x, ds.y, cfg, lr=0.05, seed=3, device=CPU, objective=pgd)
    for (name, a), b in zip(std.state_dict().items(), adv.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    keys = ("train_loss_epoch", "train_objective_epoch", "train_acc_epoch")
    assert [[r[k] for k in keys] for r in rec_adv[1:]] == [[r[k] for k in keys] for r in rec_std[1:]]
    # with eps > 0 it is another training (the attack really changes the batches)
    other = _mlp()
    pgd = PgdAt(InnerPgd(Norm.Linf, 0.1, steps=3, step_size=0.05), random_start=True, seed=3)
    fit(other, ds.x, ds.y, cfg, lr=0.05, seed=3, device=CPU, objective=pgd)
    assert not torch.equal(other.head.weight, std.head.weight)


def _fit(rd: RunDir, objective: Objective, *, resume: bool = False) -> None:
    ds = load_dataset("digits", "train", n=96, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", progress=False, threads=1)
    fit(_mlp(), ds.x, ds.y, cfg, lr=0.05, seed=3, device=CPU, objective=objective, rd=rd, resume=resume)


def _adversarial(recipe: str) -> Objective:
    attack = InnerPgd(Norm.L2, 0.5, steps=2, step_size=0.3)
    return PgdAt(attack, True, seed=3) if recipe == "pgd-at" else Trades(attack, True, seed=3, beta=1.0)


@pytest.mark.parametrize("recipe", ["pgd-at", "trades"])
def test_killed_adversarial_run_resumes_bit_for_bit(tmp_path: Path, monkeypatch, recipe: str) -> None:
    """Killed after epoch 1 of 2 (while saving epoch 2's checkpoint); resumed with a fresh objective,
    whose random-start generator comes back from the checkpoint."""
    ref = RunDir.create(tmp_path / "ref", {"kind": "x"})
    _fit(ref, _adversarial(recipe))
    restore = crash_when_saving_epoch(monkeypatch, 2)
    run = RunDir.create(tmp_path / "killed", {"kind": "x"})
    with pytest.raises(Crash):
        _fit(run, _adversarial(recipe))
    restore()
    assert load_checkpoint(run.checkpoint).epoch == 1
    _fit(run, _adversarial(recipe), resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(read_jsonl(run.path / "metrics.jsonl")) == strip(read_jsonl(ref.path / "metrics.jsonl"))
    wa, wb = load_checkpoint(ref.checkpoint).model, load_checkpoint(run.checkpoint).model
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_pgd_at_run_records_its_resolved_params(tmp_path: Path) -> None:
    text = tiny_train_toml(n_train=64, epochs=1) + '[regularizer]\nrecipe = "pgd-at"\n[regularizer.params]\n'
    cfg = write_text(tmp_path / "a.toml", text + PARAMS)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 0
    params = json.loads((tmp_path / "run" / "config.json").read_text())["regularizer"]["params"]
    # every value that ran, the unset ones resolved (digits has no reference: eps, steps... are given)
    assert params == {"norm": "Linf", "eps": 0.1, "steps": 3, "step_size": 0.05, "random_start": True}
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2
