"""The one SGD training loop: epochs, the recipe's objective, margins, checkpoints, resume, data parallelism.

Reads top to bottom::

    epoch 0:       measure margins of the initial model, log, checkpoint
    epoch 1..E:    one seeded pass over the data in minibatches (SGD, Nesterov momentum), each step
                   minimising the recipe's objective (:mod:`marginlab.training.objectives`),
                   measure margins on the fixed subsets, log one record, checkpoint

Every epoch ends with an atomic checkpoint holding the model, the optimizer and every RNG state, so a
run killed at any moment and resumed (``resume=True``) finishes bit-for-bit like an uninterrupted one on
CPU. The same code runs data-parallel under ``torchrun``: every rank draws the same permutation from
the same seeded generator and takes a contiguous shard of each global batch; each rank's loss is
weighted by its share of the batch, so DDP's gradient average equals the single-process gradient of
the mean loss over the global batch. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from marginlab.base.config import check_positive, require
from marginlab.base.device import resolve_device as _resolve_device
from marginlab.base.distributed import DistContext
from marginlab.base.errors import ConfigError
from marginlab.base.seed import torch_threads
from marginlab.lab.runs import RunDir
from marginlab.training.checkpoint import (
    RngState,
    TrainingState,
    capture_rng,
    restore_run,
    save_checkpoint,
)
from marginlab.training.objectives import CrossEntropy, Objective, ObjectiveState, StepInfo, StepLoss
from marginlab.training.progress import (
    check_tensorboard,
    epoch_line,
    log_tensorboard,
    on_terminal,
    open_tensorboard,
    postfix,
)
from marginlab.training.records import SPLITS, EpochRecord
from marginlab.training.regularizers import Regularizer
from marginlab.training.tracking import MarginTracker, save_points

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """SGD settings; the defaults are the reference's (docs/reference-settings.md) except ``epochs``.

    ``lr = None`` takes the reference rate of the regularizer recipe (0.01 standard, 0.002 regularized).
    ``device``: ``"auto"`` picks CUDA when available (:func:`marginlab.base.device.resolve_device`).
    ``tensorboard`` also writes event files (needs the ``tensorboard`` package). ``progress`` shows tqdm
    bars (only on a terminal). ``threads``: CPU threads torch may use during training (``None`` = torch's
    default); 1 is much faster for tiny models and when several runs share a machine. CPU results are
    bit-for-bit reproducible for the same seed *and* thread count (float sums are split differently
    across threads), so set it when that matters.
    ``amp``: mixed precision, the forward pass in bfloat16 (``torch.autocast``; no loss scaling is needed
    with bfloat16, so resume stays exact); off by default, since margins late in training are small
    differences of large logits (the tracked margins are always measured in float32).
    ``grad_clip``: rescale each step's gradient to at most this L2 norm over all parameters (``None``: no
    clipping, the reference); certified training (``ibp``, ``crown-ibp``) with SGD needs it on CNNs,
    whose interval bounds are loose early and give gradients large enough to diverge.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    tensorboard: bool = False
    threads: int | None = None
    amp: bool = False
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check_positive("train.threads", self.threads)
        check_positive("train.grad_clip", self.grad_clip)
        check_positive("train.epochs", self.epochs)
        check_positive("train.batch_size", self.batch_size)
        check_positive("train.lr", self.lr)
        check_positive("train.momentum", self.momentum, allow_zero=True)
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        require(not (self.nesterov and self.momentum == 0), "train.nesterov needs train.momentum > 0")
        if self.tensorboard:
            check_tensorboard()


def resolve_device(name: str, dist: DistContext | None = None) -> torch.device:
    """Deprecated: use :func:`marginlab.base.device.resolve_device` (``local_rank=dist.local_rank``,
    ``key="train.device"``), the one device choice."""
    warnings.warn(
        "marginlab.training.loop.resolve_device is deprecated; use marginlab.base.device.resolve_device",
        DeprecationWarning,
        stacklevel=2,
    )
    return _resolve_device(name, local_rank=dist.local_rank if dist else None, key="train.device")


class FeaturesAndLogits(nn.Module):
    """Wraps a model so one forward returns ``(features [B,F], logits [B,K])``.

    Regularizers need Φ(x) and the logits of the same forward pass, and DDP only synchronises gradients
    of computations that go through its own ``forward``, hence this wrapper. Models without ``phi`` and
    ``head`` return their logits as features too.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [B, ...] -> ``(features [B, F], logits [B, K])`` of one forward pass."""
        phi, head = getattr(self.model, "phi", None), getattr(self.model, "head", None)
        if phi is None or head is None:
            logits = self.model(x)
            return logits, logits
        feats = phi(x)
        return feats, head(feats)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    lr: float,
    seed: int,
    device: torch.device,
    regularizers: Sequence[Regularizer] = (),
    tracker: MarginTracker | None = None,
    rd: RunDir | None = None,
    resume: bool = False,
    dist: DistContext | None = None,
    objective: Objective | None = None,
) -> list[EpochRecord]:
    """Train ``model`` in place on ``x [N,C,H,W]``, ``y [N]``; return one metric record per epoch
    (:class:`~marginlab.training.tracking.EpochRecord`, as ``metrics.jsonl`` holds them).

    ``objective``: what each step minimises (its :meth:`~Objective.state_dict` is checkpointed); ``None``
    is :class:`CrossEntropy` with ``regularizers``, loss terms ``r(model, features, logits, y) -> scalar``
    added to the mean cross-entropy (give one or the other). ``tracker``: measures margins
    after every (tracked) epoch. ``rd``: the run directory for metrics, checkpoints and per-point margins
    (rank 0 writes; ``None`` keeps everything in memory).
    ``resume``: continue from ``rd``'s checkpoint if there is one (else start over).
    """
    if objective is None:
        objective = CrossEntropy(regularizers)
    elif regularizers:
        raise ValueError("fit: give the regularizers to the objective, not beside it")
    with torch_threads(cfg.threads):
        model.to(device)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
        loop = _Loop(cfg, model, optimizer, lr, device, dist or DistContext(), objective, tracker, rd)
        loop.data_gen.manual_seed(seed)
        if loop.dist.rank > 0:  # independent dropout streams per rank; rank 0 matches a single process
            torch.manual_seed(seed + 1_000_003 * loop.dist.rank)
        if resume:
            ckpt, records = restore_run(
                rd, model, optimizer, loop.data_gen, device, loop.dist, objective=objective
            )
            if ckpt is not None:
                loop.epoch, loop.step = ckpt.epoch, ckpt.step
                # the metrics.jsonl lines this loop wrote before the checkpoint, read back as JSON
                loop.records = cast("list[EpochRecord]", records)
                log.info("resuming after epoch %d of %d", ckpt.epoch, cfg.epochs)
        return loop.run(x.to(device), y.to(device))  # whole split on the device: indexing beats a DataLoader


def check_finite(epoch: int, rec: EpochRecord, model: nn.Module) -> None:
    """Stop a diverged run before its record and checkpoint are written (the last good one stays).

    Non-finite weights, loss or accuracy, or a NaN statistic of an *estimated* or exact margin (e.g. a
    first-order margin 0/0 once every ReLU has died), mean the optimisation blew up: the margins of such a
    model mean nothing. Bounds from attacks are not checked: an infinite bound is legitimate (a min-norm
    attack that found no adversarial reports +inf for that point, and a mean over +inf and -inf is NaN)."""
    bad = next((name for name, v in _numbers(rec) if _diverged(name, v)), None)
    nan_margin = None
    for split in SPLITS:
        split_rec = rec.get(split)
        for est, st in (split_rec.get("margins", {}) if split_rec is not None else {}).items():
            if nan_margin is None and st.get("kind") in ("estimate", "exact"):
                nan = [k for k, v in st.items() if isinstance(v, float) and math.isnan(v)]
                nan_margin = f"{split}.margins.{est}.{nan[0]}" if nan else None
    if bad is None and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        bad = "the weights"
    if bad is not None:
        raise ConfigError(f"training diverged at epoch {epoch} ({bad} is not finite); lower train.lr")
    if nan_margin is not None:
        # loss and weights are finite, yet a margin is 0/0: the logits no longer depend on the input
        # (e.g. every ReLU died), a collapse rather than a blow-up, and a lower lr is not the only cure
        raise ConfigError(
            f"training collapsed at epoch {epoch} ({nan_margin} is NaN with finite loss and weights: the "
            "logits no longer depend on the input, e.g. every ReLU is dead); lower train.lr, set "
            "train.grad_clip, or for certified training lengthen the eps warm-up"
        )


def _diverged(name: str, value: float) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(word in leaf for word in ("loss", "objective", "acc")) and not math.isfinite(value)


def _numbers(obj: object, prefix: str = "") -> list[tuple[str, float]]:
    """Every number of a nested record as ``(dotted key, value)`` (wall-clock times left out)."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() if k != "time" for kv in _numbers(v, f"{prefix}{k}.")]
    if isinstance(obj, bool) or not isinstance(obj, int | float):
        return []
    return [(prefix.rstrip("."), float(obj))]


@torch.no_grad()
def _tally(out: StepLoss, y: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """One step's contribution to the epoch sums, float64 ``[3 + len(names)]``: cross-entropy, objective,
    correct predictions and each term, the means times the ``len(y)`` points of this rank."""
    k = float(len(y))
    correct = (out.logits.argmax(1) == y).sum()
    parts = [out.ce * k, out.objective * k, correct, *(out.terms[name] * k for name in names)]
    return torch.stack([p.detach().double() for p in parts])


@dataclass
class _Loop:
    """The state the epochs share; ``epoch`` is the last finished one (-1: nothing done yet)."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    device: torch.device
    dist: DistContext
    objective: Objective
    tracker: MarginTracker | None
    rd: RunDir | None
    data_gen: torch.Generator = field(default_factory=torch.Generator)  # data order: explicit, checkpointed
    epoch: int = -1
    step: int = 0
    records: list[EpochRecord] = field(default_factory=list)

    def run(self, x: torch.Tensor, y: torch.Tensor) -> list[EpochRecord]:
        """Train the epochs after ``epoch`` up to ``cfg.epochs`` on ``x [N,C,H,W]``, ``y [N]`` (on the
        device); return every record, the resumed ones included."""
        net: nn.Module = FeaturesAndLogits(self.model)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        writer = open_tensorboard(self.cfg.tensorboard, self.rd, self.dist, purge_step=self.epoch + 1)
        # A bar for a person at a terminal, one log line per epoch for a file (nohup, a scheduler)
        shown = self.cfg.progress and self.dist.is_main and on_terminal()
        hide = not shown
        # epoch 0 (the untrained model's margins) is measured but is not a training epoch: not counted
        done = max(self.epoch, 0)
        bar = tqdm(total=self.cfg.epochs, initial=done, desc="epochs", unit="ep", disable=hide)
        steps_per_epoch = -(-len(y) // self.cfg.batch_size)  # the last batch may be short
        try:
            for epoch in range(self.epoch + 1, self.cfg.epochs + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                rec: EpochRecord = {"epoch": epoch}
                if epoch > 0:
                    self.train_epoch(net, x, y, hide, rec)
                    self.step += steps_per_epoch
                rec["step"], rec["lr"] = self.step, self.lr
                t1, c1 = time.perf_counter(), time.process_time()
                bound_s = self.track(epoch, rec, steps_per_epoch)
                check_finite(epoch, rec, self.model)
                # wall-clock times live under one key that reproducibility checks ignore; track_s
                # includes bound_s, the tracked bound's share (tracking.bound), when it was measured
                rec["time"] = {
                    "train_s": t1 - t0,
                    "train_cpu_s": c1 - c0,
                    "track_s": time.perf_counter() - t1,
                }
                if bound_s:
                    rec["time"]["bound_s"] = bound_s
                self.records.append(rec)
                self.epoch = epoch
                self.end_epoch(rec, writer)
                if shown:
                    bar.set_postfix(postfix(rec), refresh=False)
                    bar.update(1 if epoch > 0 else 0)
                elif self.dist.is_main:
                    log.info("%s", epoch_line(rec, self.cfg.epochs))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return self.records

    def train_epoch(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, hide: bool | None, rec: EpochRecord
    ) -> None:
        """One seeded pass over ``x [N,C,H,W]``, ``y [N]``; adds the epoch's mean training loss (the clean
        cross-entropy), objective, accuracy and (when the objective has any) loss terms to ``rec``."""
        net.train()
        n, bs, dist, names = len(y), self.cfg.batch_size, self.dist, self.objective.term_names()
        perm = torch.randperm(n, generator=self.data_gen).to(x.device)
        steps = -(-n // bs)
        # running sums over the epoch: cross-entropy, objective, correct predictions, each loss term
        sums = torch.zeros(3 + len(names), dtype=torch.float64, device=x.device)
        for i, start in enumerate(tqdm(range(0, n, bs), desc="batches", leave=False, disable=hide)):
            batch = perm[start : start + bs]
            lo, hi = dist.shard(len(batch))
            idx = batch[lo:hi]
            at = StepInfo(self.epoch, self.step + i, steps, self.cfg.epochs, index=idx)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
                if len(idx) == 0:  # more ranks than points in a last batch: join the all-reduce with zeros
                    feats, logits = net(x[idx])
                    loss = 0.0 * (feats.float().sum() + logits.float().sum())
                else:
                    out = self.objective(net, self.model, x[idx], y[idx], at)
                    # DDP averages gradients over ranks; weighting by this rank's share of the global
                    # batch makes that average the gradient of the mean loss over the whole batch.
                    loss = out.objective * (len(idx) * dist.world_size / len(batch))
                    sums += _tally(out, y[idx], names)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip is not None:  # after DDP's all-reduce: every rank clips the same gradient
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
        sums = dist.all_reduce_sum(sums).cpu() / n
        if not torch.isfinite(sums[1]):
            raise ConfigError(
                f"training diverged at epoch {self.epoch + 1} (the loss is {float(sums[1])}); lower train.lr"
            )
        rec["train_loss_epoch"] = float(sums[0])
        rec["train_objective_epoch"] = float(sums[1])
        rec["train_acc_epoch"] = float(sums[2])
        if names:
            rec["regularizers_epoch"] = {name: float(sums[3 + i]) for i, name in enumerate(names)}

    def track(self, epoch: int, rec: EpochRecord, steps_per_epoch: int) -> float:
        """Measure margins into ``rec`` (and keep the per-point margins) when this epoch is tracked (its
        schedule may count optimizer steps: ``steps_per_epoch``); return the seconds the tracked bound took
        (0 if none was measured)."""
        last, spe = self.cfg.epochs, steps_per_epoch
        if self.tracker is None or not self.tracker.cfg.tracks(epoch, last, spe):
            return 0.0
        cfg = self.tracker.cfg
        meas = self.tracker.measure(self.model, epoch, bound=cfg.bounds(epoch, last, spe))
        for split, split_rec in meas.record.items():
            rec[split] = split_rec
        if self.rd is not None and self.dist.is_main and cfg.saves(epoch, last, spe):
            save_points(self.rd.path, epoch, meas.points)
        return meas.bound_s

    def end_epoch(self, rec: EpochRecord, writer: Any) -> None:
        """Log the record and write the checkpoint (rank 0); every rank contributes its RNG state."""
        if self.rd is None:
            return
        rngs = cast(list[RngState], self.dist.gather_objects(capture_rng(self.data_gen, self.device)))
        objective_states = cast(list[ObjectiveState], self.dist.gather_objects(self.objective.state_dict()))
        if not self.dist.is_main:
            return
        # Order matters for kill-safety: the metrics line first, then the checkpoint. A kill in between
        # leaves a line past the checkpoint, which resume drops before redoing the epoch identically.
        self.rd.log_metrics(rec)
        state = TrainingState.capture(
            self.epoch, self.step, self.model, self.optimizer, rngs, objective=objective_states
        )
        save_checkpoint(self.rd.checkpoint, state)
        if writer is not None:
            log_tensorboard(writer, rec)
