"""The poster's motivating example: logistic regression on MNIST 0-vs-1 trained by full-batch GD.

Soudry et al. (2018): on separable data, gradient descent on the logistic loss with a constant step
``eta < 2/L`` converges *in direction* to the hard-margin SVM. This experiment shows what that means for
the margins: the minimum margin rises toward the SVM's, while the average margin falls.

The run fits the SVMs once (before GD), then records at log-spaced epochs (every epoch early on), for the
training and the test set, the loss, the error and the distribution of the exact signed L2 margins, plus
``‖w‖`` and the cosine between (w, b) and the SVM's (w, b). Two SVMs, because the model has a bias: the
classical one (bias free; its margin is the best possible minimum margin) and the one whose bias is
penalised like a weight (the SVM of the points [x, 1]), which is where GD actually converges in direction
(Soudry et al. treat the bias as the weight of a constant feature). On MNIST 0-vs-1 the two directions
have cosine ~0.945, so ``cos_svm`` tops out there while ``cos_svm_reg`` climbs toward 1. At a few epochs
it also keeps the per-point margins and (w, b) (``margins/epoch-XXXXXXX.npz``) so that histograms and
adversarial examples can be drawn later from the run directory alone. Full batch: one epoch is one GD
step. All GD is float64: late in training the margins are small differences of large logits.

Files written besides ``config.json``/``metrics.jsonl``/``summary.json``: ``svm.npz`` (the SVMs),
``adv_images.npz`` (a few fixed test images), ``margins/*.npz`` and ``checkpoint.pt`` (for ``--resume``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from tqdm import tqdm

from marginlab.base.config import check_positive, require
from marginlab.base.device import resolve_device
from marginlab.base.errors import RunDirError
from marginlab.base.fsio import atomic_write_with
from marginlab.base.seed import seed_everything
from marginlab.core.linear import binary_margins
from marginlab.core.logistic import LogisticGD
from marginlab.core.stats import margin_stats
from marginlab.core.svm import direction_cosine, hard_margin_svm
from marginlab.data import Dataset, load_dataset
from marginlab.experiments.logreg_records import LogregRecord, LogregSummary, SplitStats
from marginlab.lab.readers import read_svm
from marginlab.lab.runs import ADV_IMAGES, SVM, RunDir, margins_file
from marginlab.plots.logreg import plot_logreg
from marginlab.training.checkpoint import TrainingState, resume_state, save_checkpoint

log = logging.getLogger(__name__)

# the bias treatments of the SVMs, see _fit_svms
SVM_KINDS: tuple[Literal["free", "regularized"], ...] = ("free", "regularized")

# The SVMs as kept in the run directory (lab.names.SVM): per bias treatment ``<kind>_w [D]``, ``<kind>_b``,
# ``<kind>_margin``, ``<kind>_n_support``, ``<kind>_seconds`` (scalars as numpy scalars or 0-d arrays).
SvmArrays = Mapping[str, np.ndarray | np.generic]


@dataclass(frozen=True)
class DataConfig:
    """Which data: a two-class dataset spec (labels -1 for the first class, +1 for the second)."""

    dataset: str = "mnist:0,1"
    n_train: int | None = None  # None: the whole training split
    n_test: int | None = None
    seed: int = 0  # of the subsample draw
    data_dir: str = ""  # "" -> $MARGINLAB_DATA, else ~/.marginlab/data

    def __post_init__(self) -> None:
        check_positive("data.n_train", self.n_train)
        check_positive("data.n_test", self.n_test)


@dataclass(frozen=True)
class Config:
    """The ``logreg-gd`` experiment (one epoch = one full-batch GD step)."""

    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 2000
    step_fraction: float = 0.5  # eta = step_fraction * 2/L; any > 0 (above 1 the loss is non-monotone)
    normalized: bool = False  # normalised GD: each step divided by the current loss
    init: Literal["zero", "random"] = "zero"
    init_scale: float = 0.01  # std of the random initial (w, b)
    seed: int = 0
    every_epoch_until: int = 50  # record every epoch up to here, then log-spaced
    n_records: int = 100  # about this many log-spaced records after that
    n_snapshots: int = 4  # epochs (log-spaced) whose per-point margins and weights are kept
    n_adv_images: int = 4  # fixed test images for the adversarial-example figure
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def __post_init__(self) -> None:
        check_positive("epochs", self.epochs)
        check_positive("step_fraction", self.step_fraction)
        check_positive("init_scale", self.init_scale, allow_zero=True)
        check_positive("every_epoch_until", self.every_epoch_until, allow_zero=True)
        check_positive("n_records", self.n_records)
        require(self.n_snapshots >= 1, f"n_snapshots must be >= 1, got {self.n_snapshots!r}")
        check_positive("n_adv_images", self.n_adv_images, allow_zero=True)


# -- what is recorded, and when ------------------------------------------------------------------------
def record_epochs(epochs: int, every_until: int, n_log: int) -> list[int]:
    """Every epoch up to ``every_until``, then about ``n_log`` log-spaced epochs up to ``epochs``."""
    early = set(range(1, min(every_until, epochs) + 1))
    lo = max(every_until, 1)
    late = np.round(np.logspace(math.log10(lo), math.log10(epochs), n_log + 1)) if epochs > lo else ()
    return sorted(early | {int(e) for e in late} | {epochs})


def snapshot_epochs(recorded: list[int], k: int) -> list[int]:
    """``k`` recorded epochs, log-spaced from the first to the last (the last always included)."""
    targets = np.logspace(math.log10(recorded[0]), math.log10(recorded[-1]), k)
    logs = np.log(np.asarray(recorded, dtype=np.float64))
    picks = {recorded[int(np.argmin(np.abs(logs - math.log(t))))] for t in targets}
    return sorted(picks | {recorded[-1]})


def split_stats(
    w: torch.Tensor, b: float, x: torch.Tensor, y: torch.Tensor
) -> tuple[SplitStats, torch.Tensor]:
    """Loss, error and the distribution of the exact signed L2 margins ``y(w·x+b)/‖w‖``
    (:func:`marginlab.core.stats.margin_stats`, its ``"gd"`` form).

    Args: w [D], x [N, D], y ±1 [N] (float64). Returns the :class:`SplitStats` and the margins [N].
    """
    m = binary_margins(w, torch.tensor(b, dtype=w.dtype, device=w.device), x, y, p=2, signed=True)
    yf = m * w.norm()  # y (w·x + b): the margins already hold it, scaled by 1/‖w‖
    stats: SplitStats = {
        "loss": float(torch.nn.functional.softplus(-yf).mean()),
        "error": float((yf <= 0).double().mean()),
        "margin": margin_stats(m, form="gd"),
    }
    return stats, m


def trend_summary(metrics: list[LogregRecord], split: Literal["train", "test"]) -> dict[str, float | bool]:
    """First/last min and mean margin of ``split`` and whether they rose/fell (last vs first record):
    the ``<split>_*`` keys of :class:`LogregSummary` that come from the records, in its order."""
    first, last = metrics[0][split], metrics[-1][split]
    out: dict[str, float | bool] = {}
    for key in ("min", "mean", "median"):
        out[f"{split}_{key}_margin_first"] = first["margin"][key]
        out[f"{split}_{key}_margin_last"] = last["margin"][key]
    out[f"{split}_min_margin_best"] = max(m[split]["margin"]["min"] for m in metrics)
    out[f"{split}_min_margin_rises"] = last["margin"]["min"] > first["margin"]["min"]
    out[f"{split}_mean_margin_falls"] = last["margin"]["mean"] < first["margin"]["mean"]
    out[f"{split}_loss_first"], out[f"{split}_loss_last"] = first["loss"], last["loss"]
    out[f"{split}_error_first"], out[f"{split}_error_last"] = first["error"], last["error"]
    # Stricter readings: the poster says errors never rise (so this is no overfitting artefact).
    means = [m[split]["margin"]["mean"] for m in metrics]
    out[f"{split}_mean_margin_falls_every_record"] = all(
        b < a for a, b in zip(means, means[1:], strict=False)
    )
    out[f"{split}_error_never_rises"] = not error_rises(metrics, split)
    return out


def error_rises(
    metrics: Sequence[Mapping[str, Any]], split: Literal["train", "test"]
) -> list[tuple[int, int, float, float]]:
    """Every place where the error of ``split`` rose from one record to the next, as ``(epoch before,
    epoch, error before, error after)``: the evidence behind ``<split>_error_never_rises`` (which holds
    when this is empty). Records without the split's error are skipped."""
    points = [
        (int(m["epoch"]), float(m[split]["error"]))
        for m in metrics
        if isinstance(m.get(split), Mapping) and isinstance(m[split].get("error"), int | float)
    ]
    return [(e0, e1, a, b) for (e0, a), (e1, b) in zip(points, points[1:], strict=False) if b > a]


def _load(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    data_dir = cfg.data_dir or None
    train = load_dataset(cfg.dataset, "train", n=cfg.n_train, seed=cfg.seed, data_dir=data_dir, labels="pm1")
    test = load_dataset(cfg.dataset, "test", n=cfg.n_test, seed=cfg.seed, data_dir=data_dir, labels="pm1")
    return train, test


def _fit_svms(rd: RunDir, x: torch.Tensor, y: torch.Tensor) -> SvmArrays:
    """Both hard-margin SVMs of the training set, fit once and kept in ``svm.npz`` (for resume and plots).

    ``free``: the classical SVM (bias unpenalised): the reference margin. ``regularized``: the max-margin
    (w, b) with the bias penalised like a weight, i.e. the SVM of the points [x, 1]; this is where GD on a
    model with a bias converges in direction (Soudry et al. treat the bias as a weight on a constant 1).
    """
    path = rd.path / SVM
    cached = read_svm(rd.path)
    if cached is not None:
        missing = [f"{b}_{k}" for b in SVM_KINDS for k in ("w", "b", "margin") if f"{b}_{k}" not in cached]
        if missing or cached[f"{SVM_KINDS[0]}_w"].shape != (x.shape[1],):
            raise RunDirError(f"{path} does not hold this run's SVMs; delete it to refit them")
        return cached

    svm: dict[str, np.ndarray | np.generic] = {}
    for bias in SVM_KINDS:
        start = time.perf_counter()
        res = hard_margin_svm(x, y, bias=bias)
        seconds = time.perf_counter() - start
        svm.update({f"{bias}_w": res.w.double().numpy(), f"{bias}_b": np.float64(res.b)})
        svm.update({f"{bias}_margin": np.float64(res.margin), f"{bias}_n_support": np.int64(res.n_support)})
        svm[f"{bias}_seconds"] = np.float64(seconds)
        log.info(
            "hard-margin SVM (bias %s): margin %.5f, %d on the margin, %.1f s",
            bias,
            res.margin,
            res.n_support,
            seconds,
        )
    atomic_write_with(path, lambda f: np.savez(f, allow_pickle=False, **svm))
    return svm


def _save_adv_images(rd: RunDir, test: Dataset, k: int, seed: int) -> None:
    """Keep ``k`` fixed test images (half per class) so the adversarial figure needs no dataset."""
    if k == 0 or (rd.path / ADV_IMAGES).is_file():
        return
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for label, want in ((-1, k // 2), (1, k - k // 2)):
        idx = torch.nonzero(test.y == label).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:want]])
    idx = torch.cat(picks)
    arrays = {"x": test.x[idx].numpy(), "y": test.y[idx].numpy(), "index": idx.numpy()}
    arrays["classes"] = np.array(test.classes)  # names of the -1 and +1 classes, for titles
    atomic_write_with(rd.path / ADV_IMAGES, lambda f: np.savez_compressed(f, allow_pickle=False, **arrays))


def _initial(cfg: Config, d: int) -> tuple[torch.Tensor, float]:
    if cfg.init == "zero":
        return torch.zeros(d, dtype=torch.float64), 0.0
    gen = torch.Generator().manual_seed(cfg.seed)
    v = torch.randn(d + 1, generator=gen, dtype=torch.float64) * cfg.init_scale
    return v[:-1].clone(), float(v[-1])


def run(cfg: Config, rd: RunDir, *, resume: bool) -> LogregSummary:
    """Fit the SVMs, run GD for ``cfg.epochs`` steps recording margins; return the summary."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)  # also seeds scikit-learn's solvers, which draw from numpy's global RNG
    train, test = _load(cfg.data)
    xtr, ytr = train.x.flatten(1).double(), train.y.double()
    xte, yte = test.x.flatten(1).double(), test.y.double()
    svm = _fit_svms(rd, xtr, ytr)
    _save_adv_images(rd, test, cfg.n_adv_images, cfg.seed)

    w0, b0 = _initial(cfg, xtr.shape[1])
    start_epoch, metrics = 0, list[LogregRecord]()
    if resume:
        ck, records = resume_state(rd)  # the records up to the checkpoint (none: start over)
        metrics = cast("list[LogregRecord]", records)  # the metrics.jsonl lines this experiment wrote
        if ck is not None:
            w0, b0, start_epoch = _weights_from(ck, rd, xtr.shape[1])

    gd = LogisticGD(
        xtr, ytr, w0, b0, step_fraction=cfg.step_fraction, normalized=cfg.normalized, device=device
    )
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    log.info("logreg-gd: N=%d, L=%.6g, eta=%.6g (= %g * 2/L)", len(ytr), gd.L, gd.eta, cfg.step_fraction)
    if cfg.step_fraction >= 1 and not cfg.normalized:
        log.warning(
            "step_fraction = %g: eta >= 2/L, so the loss will not fall monotonically at first; GD on the "
            "logistic loss still converges in direction to the SVM (see marginlab.core.logistic)",
            cfg.step_fraction,
        )

    recorded = record_epochs(cfg.epochs, cfg.every_epoch_until, cfg.n_records)
    snaps = set(snapshot_epochs(recorded, cfg.n_snapshots))
    gd_seconds, epoch = 0.0, start_epoch
    with tqdm(total=cfg.epochs, initial=start_epoch, desc="logreg-gd", unit="ep", disable=None) as bar:
        for target in (e for e in recorded if e > start_epoch):
            t0 = time.perf_counter()
            gd.step(target - epoch)
            gd_seconds += time.perf_counter() - t0
            bar.update(target - epoch)
            epoch = target
            w, b = gd.weights()
            rec, margins = _record(epoch, w, b, svm, train=(xtr, ytr), test=(xte, yte))
            rd.log_metrics(rec)
            metrics.append(rec)
            if epoch in snaps:
                _save_snapshot(rd, epoch, w, b, margins)
            # GD is deterministic: the weights and the epoch are all a resume needs (no RNG, no optimizer)
            model = {"w": w.cpu(), "b": torch.tensor(b, dtype=torch.float64)}
            save_checkpoint(rd.checkpoint, TrainingState(epoch=epoch, step=epoch, model=model))
            bar.set_postfix(min=f"{rec['train']['margin']['min']:.3f}", cos=f"{rec['cos_svm_reg']:.3f}")
    return _summary(cfg, gd, svm, metrics, gd_seconds, n=(len(ytr), len(yte)), device=device)


def _weights_from(ck: TrainingState, rd: RunDir, d: int) -> tuple[torch.Tensor, float, int]:
    """(w [d], b, epoch) of a logreg-gd checkpoint, checked against the data's dimension ``d``."""
    w, b = ck.model.get("w"), ck.model.get("b")
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor) or tuple(w.shape) != (d,):
        raise RunDirError(f"checkpoint {rd.checkpoint} does not hold this run's (w, b); delete it to restart")
    return w.double(), float(b), ck.epoch


def _record(
    epoch: int,
    w: torch.Tensor,
    b: float,
    svm: SvmArrays,
    *,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
) -> tuple[LogregRecord, dict[str, np.ndarray]]:
    """One metrics record of ``w [D]``, ``b`` on ``train`` and ``test`` (``x [N, D]``, ``y ±1 [N]``, float64),
    and the per-point margins ``[N]`` (float32) of each split (kept at snapshot epochs)."""
    w_cpu = w.cpu()
    w_norm = float(w.norm())
    cos_svm, cos_svm_reg = (
        direction_cosine(w_cpu, b, torch.from_numpy(np.asarray(svm[f"{bias}_w"])), float(svm[f"{bias}_b"]))
        for bias in SVM_KINDS
    )
    train_stats, m_train = split_stats(w, b, *train)
    test_stats, m_test = split_stats(w, b, *test)
    rec: LogregRecord = {
        "epoch": epoch,
        "w_norm": w_norm,
        "b": b,
        "cos_svm": cos_svm,
        "cos_svm_reg": cos_svm_reg,
        "train": train_stats,
        "test": test_stats,
    }
    return rec, {"train": m_train.float().cpu().numpy(), "test": m_test.float().cpu().numpy()}


def _save_snapshot(rd: RunDir, epoch: int, w: torch.Tensor, b: float, margins: dict[str, np.ndarray]) -> None:
    arrays: dict[str, np.ndarray | np.generic] = {
        "epoch": np.int64(epoch),
        "w": w.cpu().numpy(),
        "b": np.float64(b),
        **margins,
    }
    path = margins_file(rd.path, epoch)
    atomic_write_with(path, lambda f: np.savez_compressed(f, allow_pickle=False, **arrays))


def _summary(
    cfg: Config,
    gd: LogisticGD,
    svm: SvmArrays,
    metrics: list[LogregRecord],
    gd_seconds: float,
    *,
    n: tuple[int, int],
    device: torch.device,
) -> LogregSummary:
    """The headline numbers (:class:`LogregSummary`); the trade-off booleans compare the last record with
    the first."""
    first, last = metrics[0], metrics[-1]
    out: dict[str, str | int | float | bool] = {
        "dataset": cfg.data.dataset,
        "n_train": n[0],
        "n_test": n[1],
        "epochs": cfg.epochs,
        "L": gd.L,
        "eta": gd.eta,
        "eta_times_L": gd.eta * gd.L,  # < 2: the loss falls monotonically; any value converges in direction
        "step_fraction": cfg.step_fraction,
        "normalized": cfg.normalized,
        "svm_margin": float(svm["free_margin"]),  # classical SVM (free bias): the best possible min margin
        "svm_reg_margin": float(svm["regularized_margin"]),  # GD's limit (bias penalised like a weight)
        "svm_n_support": int(svm["free_n_support"]),
        "svm_seconds": float(svm["free_seconds"]),
        "svm_reg_seconds": float(svm["regularized_seconds"]),
        "gd_seconds": gd_seconds,  # this session's GD steps only (after a resume: since the resume)
        "device": str(device),
        "first_epoch": first["epoch"],
        "last_epoch": last["epoch"],
    }
    out["cos_svm_first"], out["cos_svm_last"] = first["cos_svm"], last["cos_svm"]
    out["cos_svm_reg_first"], out["cos_svm_reg_last"] = first["cos_svm_reg"], last["cos_svm_reg"]
    for split in ("train", "test"):
        out.update(trend_summary(metrics, split))
        # One (w, b), hence one cosine for both splits; the keys exist per split for uniform reading.
        out[f"{split}_cosine_rises"] = last["cos_svm"] > first["cos_svm"]
        out[f"{split}_cosine_reg_rises"] = last["cos_svm_reg"] > first["cos_svm_reg"]
    checks = ("min_margin_rises", "mean_margin_falls", "cosine_rises", "cosine_reg_rises")
    out["shows_tradeoff"] = all(out[f"{s}_{k}"] for s in ("train", "test") for k in checks)
    # the keys are built from the split names above; tests/test_logreg_gd.py checks they are exactly
    # LogregSummary's, in its order
    return cast(LogregSummary, out)


def plot(run_dir: Path) -> list[Path]:
    """Redraw every figure of a ``logreg-gd`` run from its files alone."""
    return plot_logreg(Path(run_dir))
