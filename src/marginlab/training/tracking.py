"""Margin tracking during training: margins of fixed seeded subsets, measured epoch after epoch.

At every tracked epoch (epoch 0 = before any training) the tracker takes the same points of the
training and test sets, computes each chosen estimator's per-point signed margins (misclassified
points negative), plus the loss and accuracy on those points, and reduces them to a record::

    {"n": 1000, "loss": 0.21, "acc": 0.94,
     "margins": {"first-order": {"kind": "estimate", "min": -0.4, "mean": 0.9, "median": ..., "q10": ...,
                                 "q25": ..., "q75": ..., "q90": ..., "max": ..., "neg_share": 0.06}}}

Per-point margins are also kept compactly (float32 ``.npz``, ``margins/epoch-XXXX.npz``) at chosen epochs,
so histograms at several epochs can be drawn later from the files alone. Under data parallelism each
rank measures its contiguous shard of the subset and the shards are gathered on every rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marginlab.base.config import check_positive, require
from marginlab.base.distributed import DistContext
from marginlab.base.fsio import atomic_write_with, to_jsonable
from marginlab.core.norms import Norm
from marginlab.core.predict import predict_logits
from marginlab.core.stats import QUANTILES as QUANTILES  # re-exported: the old name
from marginlab.core.stats import margin_stats
from marginlab.estimators import estimate_margins
from marginlab.estimators.base import ESTIMATORS, MarginKind, validate_params
from marginlab.lab.readers import margins_files, read_margins_file
from marginlab.lab.runs import margins_file
from marginlab.nets.models import linear_layers
from marginlab.training.records import (
    BoundSummary,
    Split,
    SplitRecord,
    margin_summary,
)

_NORMS = (Norm.L2, Norm.Linf)  # tracking.p: 2 or "inf" (recorded as written)
_P_ERROR = 'tracking.p must be 2 or "inf", got {value!r}'


@dataclass(frozen=True)
class TrackingConfig:
    """Which margins to track, on how many points, how often.

    ``n_train`` / ``n_test``: size of the fixed seeded subsets (``"all"`` = the whole split).
    ``p``: the attack norm (2 or "inf"); estimators use its dual for gradients.
    ``every``: track every k-th epoch, or ``"log"``: track on a log-spaced grid of optimizer steps,
    ``per_decade`` grid points per decade (steps 1, 1.26, 1.58, ..., 10, 12.6, ... for 10): an epoch is
    tracked when its steps reach a new grid point, so a 20,000-step run is tracked ~45 times, densely
    while the margins move fast and sparsely in the slow late phase (epoch 0, 1 and the last are always
    tracked). ``save_margins_every``: also keep per-point margins (``.npz``) every k-th tracked epoch
    (``"log"``: every k-th grid point; 0 = only at epochs 0, 1 and the last); ``bound_every`` likewise.
    ``params``: per-estimator options, ``{name: {key: value}}``.
    ``bound``: a certified or min-norm *bound* tracked beside the estimates (e.g. ``"ddn"`` or ``"best"``,
    upper bounds; ``"crown"``, a lower bound), so that a claim about the margins rests on a bound and not
    only on an estimate; it runs on the first ``bound_n`` points of each subset, every ``bound_every``-th
    epoch (and at epochs 0, 1 and the last), with ``bound_params``: it costs a min-norm attack per point,
    hence the small fixed subset.
    """

    estimators: tuple[str, ...] = ("first-order",)
    n_train: int | Literal["all"] = 1000
    n_test: int | Literal["all"] = 1000
    p: float | str = 2.0
    every: int | Literal["log"] = 1
    per_decade: int = 10
    save_margins_every: int = 1
    batch_size: int = 500
    params: dict[str, Any] = field(default_factory=dict)
    bound: str | None = None
    bound_every: int = 5
    bound_n: int = 100
    bound_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(len(self.estimators) > 0, "tracking.estimators must name at least one estimator")
        for name in self.estimators:
            ESTIMATORS.get(name)  # a typo fails here, before any run directory exists
        for name in self.params:
            require(
                name in self.estimators, f"tracking.params.{name}: {name!r} is not in tracking.estimators"
            )
            validate_params(name, self.params[name], f"tracking.params.{name}")  # types and ranges, now
        Norm.parse(self.p, _NORMS, error=_P_ERROR)  # a bad norm fails now, before any run directory
        for key in ("n_train", "n_test"):
            n = getattr(self, key)
            require(n == "all" or (isinstance(n, int) and n > 0), f'tracking.{key} must be > 0 or "all"')
        require(
            self.every == "log" or (isinstance(self.every, int) and not isinstance(self.every, bool)),
            f'tracking.every must be a positive integer or "log", got {self.every!r}',
        )
        if self.every != "log":
            check_positive("tracking.every", self.every)
        check_positive("tracking.per_decade", self.per_decade)
        check_positive("tracking.save_margins_every", self.save_margins_every, allow_zero=True)
        check_positive("tracking.batch_size", self.batch_size)
        self._check_bound()

    def _check_bound(self) -> None:
        if self.bound is None:
            return
        est = ESTIMATORS.get(self.bound)
        require(
            est.kind in (MarginKind.UPPER, MarginKind.LOWER),
            f"tracking.bound {self.bound!r} is {est.kind.value}, not a bound; use e.g. ddn, best or crown",
        )
        require(self.bound not in self.estimators, f"tracking.bound {self.bound!r} is already an estimator")
        require(self.p_value in est.norms, f"tracking.bound {self.bound!r} does not support p={self.p}")
        check_positive("tracking.bound_every", self.bound_every)
        check_positive("tracking.bound_n", self.bound_n)
        validate_params(self.bound, self.bound_params, "tracking.bound_params")

    @property
    def norm(self) -> Norm:
        """The attack norm ``p`` names (L2 or Linf; ``p`` itself is recorded as written)."""
        return Norm.parse(self.p, _NORMS, error=_P_ERROR)

    @property
    def p_value(self) -> float:
        """The order of :attr:`norm`: 2.0 or ``math.inf``."""
        return self.norm.p

    def tracks(self, epoch: int, last: int, steps_per_epoch: int = 1) -> bool:
        """Whether ``epoch`` is tracked (of a run whose last epoch is ``last`` and whose epochs take
        ``steps_per_epoch`` optimizer steps each)."""
        return epoch in (0, 1, last) or self._every(epoch, 1, steps_per_epoch)

    def bounds(self, epoch: int, last: int, steps_per_epoch: int = 1) -> bool:
        """Whether the bound is measured at ``epoch`` (a tracked epoch)."""
        if self.bound is None:
            return False
        return epoch in (0, 1, last) or self._every(
            epoch, self.bound_every, steps_per_epoch, of_tracked=False
        )

    def saves(self, epoch: int, last: int, steps_per_epoch: int = 1) -> bool:
        """Whether the per-point margins of tracked ``epoch`` are kept as ``.npz``."""
        k = self.save_margins_every
        return epoch in (0, 1, last) or (k > 0 and self._every(epoch, k, steps_per_epoch))

    def _every(self, epoch: int, k: int, steps_per_epoch: int, *, of_tracked: bool = True) -> bool:
        """Whether ``epoch`` is the k-th of the schedule's points: every ``k * every``-th epoch (or every
        ``k``-th epoch, ``of_tracked=False``: the bound's own period), or, on the log grid, whether the
        epoch's steps reach a grid point whose index is a multiple of ``k``."""
        if self.every == "log":
            hi, lo = epoch * steps_per_epoch, (epoch - 1) * steps_per_epoch
            return log_grid_index(hi, self.per_decade) // k > log_grid_index(lo, self.per_decade) // k
        return epoch % (k * self.every if of_tracked else k) == 0


def log_grid_index(step: int, per_decade: int) -> int:
    """How many points of the log grid ``10 ** (j / per_decade)``, ``j = 0, 1, ...`` are ``<= step``
    (0 for step 0). Exact at the grid's integer points (10, 100, ...), where a float log10 may round
    either way."""
    if step < 1:
        return 0
    j = math.floor(per_decade * math.log10(step))
    while 10 ** ((j + 1) / per_decade) <= step:
        j += 1
    while j >= 0 and 10 ** (j / per_decade) > step:
        j -= 1
    return j + 1


def fixed_subset(n_total: int, n: int | str | None, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded subset of size ``n`` of ``range(n_total)`` (all for ``None``/``"all"``)."""
    if n is None or n == "all" or int(n) >= n_total:
        return torch.arange(n_total)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[:n].sort().values


@dataclass
class Measurement:
    """One tracked epoch: the JSON ``record`` per split and the per-point arrays behind it (full subset);
    ``bound_s``: the seconds the bound took (0 when it was not measured)."""

    record: dict[Split, SplitRecord]
    points: dict[str, dict[str, np.ndarray]]
    bound_s: float = 0.0


class MarginTracker:
    """Measures margins, loss and accuracy on fixed subsets of the train and test sets.

    Args:
        cfg: what to track.
        splits: ``{"train": (x [N,C,H,W], y [N]), "test": (...)}``, whole splits; subsets are drawn here.
        seed: seeds the subset choice and, per epoch, any randomness of the estimators.
        device: where to compute.
        dist: data-parallel context; each rank measures its shard.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        splits: dict[Split, tuple[torch.Tensor, torch.Tensor]],
        *,
        seed: int,
        device: torch.device,
        dist: DistContext | None = None,
    ) -> None:
        self.cfg, self.seed, self.device = cfg, seed, device
        self.dist = dist or DistContext()
        names = [*cfg.estimators, *([cfg.bound] if cfg.bound else [])]
        self.kinds = {n: str(to_jsonable(getattr(ESTIMATORS.get(n), "kind", "unknown"))) for n in names}
        sizes = {"train": cfg.n_train, "test": cfg.n_test}
        self.subsets: dict[Split, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for i, (split, (x, y)) in enumerate(splits.items()):
            idx = fixed_subset(len(y), sizes.get(split), seed + 7919 * (i + 1))
            self.subsets[split] = (idx, x[idx], y[idx])

    def measure(self, model: nn.Module, epoch: int, *, bound: bool = False) -> Measurement:
        """Margins, loss and accuracy of ``model`` on every subset (its train/eval mode is restored);
        with ``bound``, also ``cfg.bound`` on the first ``cfg.bound_n`` points of each subset."""
        was_training = model.training
        model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        record: dict[Split, SplitRecord] = {}
        points: dict[str, dict[str, np.ndarray]] = {}
        bound_s = 0.0
        # Estimators may draw random numbers; a forked, epoch-seeded stream keeps the training RNG
        # untouched (so tracking never changes training) and makes every measurement reproducible.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 100_003 + epoch)
            for split, (idx, x, y) in self.subsets.items():
                record[split], points[split] = self._measure_split(model, x, y)
                points[split]["index"] = idx.numpy()
                if bound and self.cfg.bound is not None:
                    k, start = min(self.cfg.bound_n, len(y)), time.perf_counter()
                    record[split]["margins"][self.cfg.bound] = self._measure_bound(model, x[:k], y[:k])
                    bound_s += time.perf_counter() - start
        model.train(was_training)
        return Measurement(record, points, bound_s)

    def _measure_split(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[SplitRecord, dict[str, np.ndarray]]:
        n = len(y)
        start, stop = self.dist.shard(n)
        xs, ys = x[start:stop].to(self.device), y[start:stop].to(self.device)
        loss, correct, gap = self._loss_correct(model, xs, ys)
        if stop > start:
            results = estimate_margins(
                model, xs, ys, list(self.cfg.estimators), p=self.cfg.p_value,
                batch_size=self.cfg.batch_size, params=self.cfg.params or None,
            )  # fmt: skip
            margins = {name: r.values for name, r in results.items()}
        else:  # an empty shard (fewer points than ranks)
            margins = {name: xs.new_zeros(0) for name in self.cfg.estimators}
        loss = self.dist.all_gather_shards(loss.double(), n).cpu()
        correct = self.dist.all_gather_shards(correct, n).cpu()
        gap = self.dist.all_gather_shards(gap.double(), n).cpu()
        # estimators return CPU tensors; NCCL gathers only device tensors
        dev = self.device
        full = {
            k: self.dist.all_gather_shards(v.detach().double().to(dev), n).cpu() for k, v in margins.items()
        }
        rec: SplitRecord = {
            "n": n,
            "loss": float(loss.mean()),
            "acc": float(correct.double().mean()),
            "margins": {k: margin_summary(self.kinds[k], v) for k, v in full.items()},
            "logit_margin": margin_stats(gap),
            "normalised_margin": margin_stats(gap / weight_norm_product(model)),
        }
        arrays = {k: v.float().numpy() for k, v in full.items()}
        arrays["y"] = y.numpy()
        arrays["correct"] = correct.numpy().astype(bool)
        return rec, arrays

    def _measure_bound(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> BoundSummary:
        """The bound's statistics on ``x [k, ...]`` (sharded over ranks like the estimates)."""
        assert self.cfg.bound is not None
        n = len(y)
        start, stop = self.dist.shard(n)
        xs, ys = x[start:stop].to(self.device), y[start:stop].to(self.device)
        values = xs.new_zeros(0, dtype=torch.float64)
        if stop > start:
            params = {self.cfg.bound: dict(self.cfg.bound_params)} if self.cfg.bound_params else None
            res = estimate_margins(
                model,
                xs,
                ys,
                [self.cfg.bound],
                p=self.cfg.p_value,
                batch_size=self.cfg.batch_size,
                params=params,
            )
            values = res[self.cfg.bound].values
        full = self.dist.all_gather_shards(values.double().to(self.device), n).cpu()
        # margin_stats's keys (its "tracking" form) are exactly BoundSummary's others, after kind and n
        return cast(BoundSummary, {"kind": self.kinds[self.cfg.bound], "n": n, **margin_stats(full)})

    @torch.no_grad()
    def _loss_correct(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-point cross-entropy ``[n]``, correctness ``[n]`` (int64) and logit margin ``[n]``
        (:func:`logit_margin`) on this rank's shard."""
        if len(y) == 0:
            return x.new_zeros(0), y.new_zeros(0), x.new_zeros(0)
        bs = self.cfg.batch_size
        logits = predict_logits(model, x, bs)
        # the loss batch by batch, on the batches the logits came from
        pairs = zip(logits.split(bs), y.split(bs), strict=True)
        losses = [F.cross_entropy(lb, yb, reduction="none") for lb, yb in pairs]
        return torch.cat(losses), (logits.argmax(1) == y).long(), logit_margin(logits, y)


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per point, ``[n]``, from logits ``[n, K]`` and labels ``[n]``: the
    output-space margin (negative on a misclassified point)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -math.inf)
    return true - others.amax(1)


@torch.no_grad()
def weight_norm_product(model: nn.Module) -> float:
    """prod_l ||W_l||_F over every Linear and Conv2d weight of ``model`` (head included): the scale by
    which the normalised margin of Lyu & Li (2020) divides the output margin. For a net without biases
    whose activations are positively homogeneous (ReLU) the network is L-homogeneous in its weights, so
    this product makes the margin scale-free; with biases it is the customary proxy."""
    return math.prod(float(w.detach().double().norm()) for w in linear_layers(model))


def save_points(run_dir: str | Path, epoch: int, points: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write per-point arrays as ``margins/epoch-XXXX.npz`` with keys ``"<split>/<name>"`` (atomic)."""
    path = margins_file(run_dir, epoch)
    flat = {f"{split}/{k}": v for split, d in points.items() for k, v in d.items()}
    # numeric arrays only (read back with allow_pickle=False); naming the flag keeps the keys for arrays
    atomic_write_with(path, lambda f: np.savez_compressed(f, allow_pickle=False, **flat))
    return path


def load_points(run_dir: str | Path) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """Every saved ``epoch -> split -> name -> array`` of a run directory (empty if none)."""
    out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for epoch, path in margins_files(run_dir).items():
        for key, value in read_margins_file(path).items():
            split, _, name = key.partition("/")
            out.setdefault(epoch, {}).setdefault(split, {})[name] = value
    return out
