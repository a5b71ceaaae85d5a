"""The one training state and its checkpoint: save -> load gives identical tensors, RNG streams and loss-term
state, for the SGD loop (``train``) and full-batch GD (``logreg-gd``) alike; files in the layout the
previous code wrote (FORMAT 2) still load; a run directory is rewound to its checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginlab.base.distributed import DistContext
from marginlab.base.errors import ConfigError, RunDirError
from marginlab.lab.runs import RunDir
from marginlab.nets.models import build_model
from marginlab.training.checkpoint import (
    FORMAT,
    TrainingState,
    capture_rng,
    load_checkpoint,
    restore_rng,
    resume_state,
    save_checkpoint,
)
from marginlab.training.regularizers import AverageMargin, Orthogonality, Regularizer

CPU = torch.device("cpu")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=3, input_shape=(1, 4, 4), widths=(8,))


def _train_objects(seed: int):
    """A model, a momentum SGD optimizer, stateful loss terms and a data-order generator."""
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    regs: list[Regularizer] = [AverageMargin(0.1, 5.0), Orthogonality(1e-3, every=3, probes=2, seed=seed)]
    return model, opt, regs, torch.Generator().manual_seed(seed)


def _steps(model, opt, regs, gen, n: int) -> list[float]:
    """``n`` SGD steps on random data (drawn from every RNG stream); the losses."""
    losses = []
    for _ in range(n):
        idx = torch.randperm(16, generator=gen)[:8]
        x = torch.rand(16, 1, 4, 4)[idx] + float(np.random.rand()) + random.random()
        y = torch.arange(8) % 3
        feats = model.phi(x)
        logits = model.head(feats)
        loss = F.cross_entropy(logits, y) + sum(r(model, feats, logits, y) for r in regs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_train_state_round_trip_continues_identically(tmp_path: Path) -> None:
    model, opt, regs, gen = _train_objects(seed=1)
    random.seed(5)
    np.random.seed(5)
    _steps(model, opt, regs, gen, 4)  # momentum buffers, a step counter and a used probe stream
    state = TrainingState.capture(2, 4, model, opt, [capture_rng(gen, CPU)], regs)
    save_checkpoint(tmp_path / "c.pt", state)
    # independent copies of the tensors now (state_dict() shares storage with the live, changing tensors)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [p.clone() for p in (opt.state[q]["momentum_buffer"] for q in model.parameters())]
    ahead = _steps(model, opt, regs, gen, 5)  # the uninterrupted continuation

    loaded = load_checkpoint(tmp_path / "c.pt")
    assert (loaded.epoch, loaded.step, len(loaded.rng)) == (2, 4, 1)
    assert loaded.model.keys() == weights.keys()
    assert all(torch.equal(loaded.model[k], weights[k]) for k in weights)
    bufs = [s["momentum_buffer"] for s in loaded.optimizer["state"].values()]
    assert len(bufs) == len(momenta) and all(torch.equal(a, b) for a, b in zip(bufs, momenta, strict=True))
    assert loaded.regularizers is not None and loaded.regularizers[1]["step"] == 4

    model2, opt2, regs2, gen2 = _train_objects(seed=9)  # other weights, other streams: all overwritten
    random.seed(0)
    np.random.seed(0)
    loaded.restore(model2, opt2, regs2, gen2, CPU, rank=0, path=tmp_path / "c.pt")
    assert all(torch.equal(model2.state_dict()[k], weights[k]) for k in weights)
    assert _steps(model2, opt2, regs2, gen2, 5) == ahead  # same losses: same data, noise and probes
    after, after2 = model.state_dict(), model2.state_dict()
    assert all(torch.equal(after[k], after2[k]) for k in after)


def test_rng_round_trip_through_a_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", TrainingState(0, 0, {}, rng=[capture_rng(gen, CPU)]))
    draws = (
        torch.rand(4),
        np.random.rand(4),
        [random.random() for _ in range(4)],
        torch.randperm(9, generator=gen),
    )
    restore_rng(load_checkpoint(tmp_path / "c.pt").rng[0], gen, CPU)
    again = (
        torch.rand(4),
        np.random.rand(4),
        [random.random() for _ in range(4)],
        torch.randperm(9, generator=gen),
    )
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2] and torch.equal(draws[3], again[3])


def test_logreg_state_round_trip_and_file_layout(tmp_path: Path) -> None:
    w = torch.randn(7, dtype=torch.float64)
    b = torch.tensor(0.25, dtype=torch.float64)
    save_checkpoint(tmp_path / "c.pt", TrainingState(epoch=40, step=40, model={"w": w, "b": b}))
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert (loaded.epoch, loaded.step, loaded.optimizer, loaded.rng) == (40, 40, {}, [])
    assert loaded.regularizers is None and loaded.extra == {}
    assert torch.equal(loaded.model["w"], w) and loaded.model["w"].dtype == torch.float64
    assert torch.equal(loaded.model["b"], b)
    # exactly the dict the previous logreg-gd code wrote
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert list(raw) == ["format", "epoch", "step", "model", "optimizer", "rng", "extra"]
    assert (raw["format"], raw["optimizer"], raw["rng"], raw["extra"]) == (2, {}, [], {})


def test_files_in_the_previous_layout_still_load(tmp_path: Path) -> None:
    """A FORMAT 2 file as the previous train loop wrote it (loss-term states under extra)."""
    model, opt, regs, gen = _train_objects(seed=2)
    _steps(model, opt, regs, gen, 2)
    old = {
        "format": 2,
        "epoch": 1,
        "step": 2,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": [capture_rng(gen, CPU)],
        "extra": {
            "regularizers": [{}, {"step": 2, "rng": {"cpu": torch.ones(3, dtype=torch.uint8)}, "last": 0.5}]
        },
    }
    torch.save(old, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.regularizers is not None and loaded.extra == {}
    (empty, ortho) = loaded.regularizers
    assert empty == {} and (ortho["step"], ortho["last"]) == (2, 0.5)
    assert torch.equal(ortho["rng"]["cpu"], torch.ones(3, dtype=torch.uint8))
    assert FORMAT == 2
    # and saving it again writes the same dict back
    save_checkpoint(tmp_path / "new.pt", loaded)
    again = torch.load(tmp_path / "new.pt", weights_only=True)
    assert list(again) == list(old) and again["extra"].keys() == old["extra"].keys()
    torch.save({**old, "format": 1}, tmp_path / "v1.pt")
    with pytest.raises(RunDirError, match="unknown format; it was written by another version"):
        load_checkpoint(tmp_path / "v1.pt")


def test_resume_state_rewinds_the_run_directory(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path / "run", {"kind": "x"})
    try:
        for epoch in range(5):
            rd.log_metrics({"epoch": epoch})
        assert resume_state(rd) == (None, [])  # no checkpoint: start over, records dropped
        for epoch in range(5):
            rd.log_metrics({"epoch": epoch})
        save_checkpoint(rd.checkpoint, TrainingState(epoch=2, step=2, model={}))
        state, records = resume_state(rd)
        assert state is not None and state.epoch == 2
        assert [r["epoch"] for r in records] == [0, 1, 2] == [r["epoch"] for r in rd.metrics()]
        save_checkpoint(rd.checkpoint, TrainingState(2, 2, {}, rng=[capture_rng(torch.Generator(), CPU)] * 2))
        with pytest.raises(
            ConfigError, match=r"checkpointed by 2 process\(es\); resume it with as many \(now 1\)"
        ):
            resume_state(rd, DistContext())
    finally:
        rd.unlock()
