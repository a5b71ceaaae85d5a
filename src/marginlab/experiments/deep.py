"""Experiment ``train``: SGD training of a deep model while tracking its margins (the poster's deep panels).

A config names a dataset, a model, the SGD settings, what margins to track and an optional regularizer
recipe; ``run`` trains with :func:`marginlab.train.fit` (the one training loop), writes per-epoch
records and per-point margins into the run directory, saves the final weights as ``model.pt`` (a plain
``state_dict``) and returns a summary that says, per estimator and split, whether the minimum margin rose
and the mean margin fell, and where it did not. The comparison experiment reuses :func:`run` per recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marginlab.config import check_positive
from marginlab.distributed import init_distributed
from marginlab.fsio import atomic_torch_save
from marginlab.regularizers import RegularizerConfig
from marginlab.runs import WEIGHTS, RunDir
from marginlab.tracking import TrackingConfig
from marginlab.train import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    """``dataset``: a spec (``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"digits"``, ``"mnist:0,1"``).

    ``n_train``: train on a seeded subset of that size (``None`` = the whole training split);
    ``seed`` picks it, independently of the training seed. ``data_dir``: where dataset files live.
    """

    dataset: str = "mnist"
    n_train: int | None = None
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        from marginlab.data.base import get_info
        from marginlab.data.subsets import parse_spec

        get_info(parse_spec(self.dataset)[0])  # unknown datasets fail before any run directory exists
        check_positive("data.n_train", self.n_train)


@dataclass(frozen=True)
class ModelConfig:
    """``name``: an architecture of ``marginlab.models.MODELS`` or ``FILE.py:Class`` /
    ``package.module:factory`` (see :mod:`marginlab.model_io`); ``options``: its keyword options
    (``widths``, ``channels``, ``dropout``...). The input shape and class count come from the dataset."""

    name: str = "mnist-mlp"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from marginlab.model_io import check_spec

        check_spec(self.name, self.options)  # a registry name or FILE.py:Class; option names and types


@dataclass(frozen=True)
class Config:
    """The ``train`` experiment: every section has the reference defaults (docs/reference-settings.md)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)

    def __post_init__(self) -> None:
        from marginlab.regularizers import resolve_config

        resolve_config(self.regularizer, self.model.name, self.data.dataset)  # e.g. no reference gamma

    @property
    def lr(self) -> float:
        """The learning rate: ``train.lr``, else the reference rate of the regularizer recipe."""
        from marginlab.regularizers import reference_lr

        return (
            self.train.lr
            if self.train.lr is not None
            else reference_lr(self.regularizer.recipe, self.model.name)
        )


def resolve(cfg: Config) -> Config:
    """``cfg`` with the values it derives filled in, as recorded in ``config.json``: the learning rate
    of the recipe and the regularizer's reference weights (λ, γ, β) where they were left unset."""
    from marginlab.regularizers import resolve_config

    return replace(
        cfg,
        train=replace(cfg.train, lr=cfg.lr),
        regularizer=resolve_config(cfg.regularizer, cfg.model.name, cfg.data.dataset),
    )


def run(cfg: Config, rd: RunDir, *, resume: bool) -> dict[str, Any]:
    """Train, track margins into ``rd`` and return the summary (see :func:`summarize`)."""
    from marginlab.data import load_dataset
    from marginlab.model_io import build_from_spec
    from marginlab.regularizers import build_regularizers
    from marginlab.seed import seed_everything
    from marginlab.tracking import MarginTracker
    from marginlab.train import fit, resolve_device

    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    dist = init_distributed("cuda" if want_cuda else "cpu")
    device = resolve_device(cfg.train.device, dist)
    d = cfg.data
    train = load_dataset(d.dataset, "train", n=d.n_train, seed=d.seed, data_dir=d.data_dir)
    test = load_dataset(d.dataset, "test", data_dir=d.data_dir)
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    shape = {"num_classes": train.num_classes, "input_shape": train.input_shape}
    model = build_from_spec(cfg.model.name, **shape, options=cfg.model.options)
    regularizers = build_regularizers(cfg.regularizer, cfg.model.name, d.dataset)
    splits = {"train": (train.x, train.y), "test": (test.x, test.y)}
    tracker = MarginTracker(cfg.tracking, splits, seed=cfg.seed, device=device, dist=dist)
    records = fit(
        model, train.x, train.y, cfg.train, lr=cfg.lr, seed=cfg.seed, device=device,
        regularizers=regularizers, tracker=tracker, rd=rd, resume=resume, dist=dist,
    )  # fmt: skip
    extra = {
        "n_train": len(train),
        "n_test": len(test),
        "clean_accuracy": {
            "train": accuracy(model, train.x, train.y),
            "test": accuracy(model, test.x, test.y),
        },
    }
    if dist.is_main:
        atomic_torch_save(model.state_dict(), rd.path / WEIGHTS)
    return summarize(cfg, records, rd.path, extra)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Clean accuracy of ``model`` on ``x [N,C,H,W]``, ``y [N]`` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


def summarize(
    cfg: Config, records: list[dict[str, Any]], run_dir: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    """The run's summary: setup, ``extra`` (clean accuracies, sizes) and the margin trends per estimator."""
    from marginlab.trends import margin_trends

    t = cfg.tracking
    trends = margin_trends(records, run_dir, [*t.estimators, *([t.bound] if t.bound else [])])
    last = records[-1] if records else {}
    return {
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "recipe": cfg.regularizer.recipe,
        "epochs": cfg.train.epochs,
        "lr": cfg.lr,
        **extra,
        "final_train_loss": last.get("train_loss_epoch"),
        "margins": trends["margins"],
        "findings": trends["findings"],
        "definitions": trends["definitions"],
    }


def plot(run_dir: Path) -> list[Path]:
    """Redraw every figure of a ``train`` run from its files (see :mod:`marginlab.plots.training`)."""
    from marginlab.plots.training import plot_training

    return plot_training(run_dir)
