"""Experiment ``train``: SGD training of a deep model while tracking its margins (the poster's deep panels).

A config names a dataset, a model, the SGD settings, what margins to track and an optional regularizer
recipe; ``run`` trains with :func:`marginlab.training.loop.fit` (the one training loop), writes per-epoch
records and per-point margins into the run directory, saves the final weights as ``model.pt`` (a plain
``state_dict``) and returns a summary that says, per estimator and split, whether the minimum margin rose
and the mean margin fell, and where it did not. The comparison experiment reuses :func:`run` per recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from marginlab.base.config import check_positive
from marginlab.base.device import resolve_device
from marginlab.base.distributed import init_distributed
from marginlab.base.fsio import atomic_torch_save
from marginlab.base.seed import seed_everything
from marginlab.core.predict import predict_labels
from marginlab.data import load_dataset
from marginlab.data.base import get_info
from marginlab.data.subsets import parse_spec
from marginlab.lab.runs import WEIGHTS, RunDir
from marginlab.nets.usercode import build_from_spec, check_spec
from marginlab.plots.training import plot_training
from marginlab.training.loop import TrainConfig, fit
from marginlab.training.recipes import (
    RegularizerConfig,
    build_objective,
    reference_lr,
    resolve_config,
)
from marginlab.training.records import EpochRecord, Split
from marginlab.training.tracking import MarginTracker, TrackingConfig
from marginlab.training.trends import EstimatorTrends, margin_trends


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
        get_info(parse_spec(self.dataset)[0])  # unknown datasets fail before any run directory exists
        check_positive("data.n_train", self.n_train)


@dataclass(frozen=True)
class ModelConfig:
    """``name``: an architecture of ``marginlab.nets.models.MODELS`` or ``FILE.py:Class`` /
    ``package.module:factory`` (see :mod:`marginlab.nets.spec`); ``options``: its keyword options
    (``widths``, ``channels``, ``dropout``...). The input shape and class count come from the dataset."""

    name: str = "mnist-mlp"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
        resolve_config(self.regularizer, self.model.name, self.data.dataset)  # e.g. no reference gamma

    @property
    def lr(self) -> float:
        """The learning rate: ``train.lr``, else the reference rate of the regularizer recipe."""
        return (
            self.train.lr
            if self.train.lr is not None
            else reference_lr(self.regularizer.recipe, self.model.name)
        )


def resolve(cfg: Config) -> Config:
    """``cfg`` with the values it derives filled in, as recorded in ``config.json``: the learning rate
    of the recipe, the regularizer's reference weights (λ, γ, β) where they were left unset and every
    parameter of the recipe's objective (``regularizer.params``: ε, steps... of ``pgd-at``)."""
    return replace(
        cfg,
        train=replace(cfg.train, lr=cfg.lr),
        regularizer=resolve_config(cfg.regularizer, cfg.model.name, cfg.data.dataset),
    )


class SplitAccuracy(TypedDict):
    """Clean accuracy of the final model on the whole train and test splits."""

    train: float
    test: float


class RunFacts(TypedDict):
    """What :func:`run` measures beside the trends: split sizes and the final clean accuracies."""

    n_train: int
    n_test: int
    clean_accuracy: SplitAccuracy


class Summary(RunFacts):
    """``summary.json`` of a ``train`` run (the runner adds ``kind`` in front): the setup, the
    :class:`RunFacts`, the last epoch's mean training loss, and the margin trends per estimator with the
    findings in words and the definitions of their keys (:mod:`marginlab.training.trends`)."""

    dataset: str
    model: str
    recipe: str
    epochs: int
    lr: float
    final_train_loss: float | None
    margins: dict[str, EstimatorTrends]
    findings: list[str]
    definitions: dict[str, str]


def run(cfg: Config, rd: RunDir, *, resume: bool) -> Summary:
    """Train, track margins into ``rd`` and return the summary (see :func:`summarize`)."""
    kind = resolve_device(cfg.train.device, key="train.device").type  # "cuda" or "cpu": the backend
    dist = init_distributed(kind)
    device = resolve_device(cfg.train.device, local_rank=dist.local_rank, key="train.device")
    d = cfg.data
    train = load_dataset(d.dataset, "train", n=d.n_train, seed=d.seed, data_dir=d.data_dir)
    test = load_dataset(d.dataset, "test", data_dir=d.data_dir)
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    model = build_from_spec(
        cfg.model.name,
        num_classes=train.num_classes,
        input_shape=train.input_shape,
        options=cfg.model.options,
    )
    objective = build_objective(cfg.regularizer, cfg.model.name, d.dataset, seed=cfg.seed)
    splits: dict[Split, tuple[torch.Tensor, torch.Tensor]] = {
        "train": (train.x, train.y),
        "test": (test.x, test.y),
    }
    tracker = MarginTracker(cfg.tracking, splits, seed=cfg.seed, device=device, dist=dist)
    records = fit(
        model, train.x, train.y, cfg.train, lr=cfg.lr, seed=cfg.seed, device=device,
        objective=objective, tracker=tracker, rd=rd, resume=resume, dist=dist,
    )  # fmt: skip
    extra: RunFacts = {
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
    pred = predict_labels(model, x, batch_size, device=next(model.parameters()).device)
    model.train(was_training)
    return int((pred.cpu() == y).sum()) / max(len(y), 1)


def summarize(cfg: Config, records: Sequence[EpochRecord], run_dir: Path, extra: RunFacts) -> Summary:
    """The run's summary: setup, ``extra`` (clean accuracies, sizes) and the margin trends per estimator."""
    t = cfg.tracking
    trends = margin_trends(records, run_dir, [*t.estimators, *([t.bound] if t.bound else [])])
    last = records[-1] if records else None
    return {
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "recipe": cfg.regularizer.recipe,
        "epochs": cfg.train.epochs,
        "lr": cfg.lr,
        **extra,
        "final_train_loss": last.get("train_loss_epoch") if last is not None else None,
        "margins": trends["margins"],
        "findings": trends["findings"],
        "definitions": trends["definitions"],
    }


def plot(run_dir: Path) -> list[Path]:
    """Redraw every figure of a ``train`` run from its files (see :mod:`marginlab.plots.training`)."""
    return plot_training(run_dir)
