"""What a person watches during training: tqdm progress bars and optional TensorBoard event files.

TensorBoard is never a hard dependency: ``train.tensorboard = true`` is checked when the config is built
and, if ``torch.utils.tensorboard`` does not import, fails with a one-line :class:`ConfigError`.
"""

from __future__ import annotations

from typing import Any

from marginlab.distributed import DistContext
from marginlab.errors import ConfigError
from marginlab.runs import RunDir

TENSORBOARD_DIR = "tensorboard"


def check_tensorboard() -> None:
    """Raise a one-line :class:`ConfigError` unless ``torch.utils.tensorboard`` imports."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tensorboard = true needs the tensorboard package: pip install tensorboard (or set it false)"
        ) from None


def open_tensorboard(enabled: bool, rd: RunDir | None, dist: DistContext, purge_step: int) -> Any:
    """A ``SummaryWriter`` into ``rd/tensorboard`` on rank 0 when enabled, else ``None``."""
    if not enabled or rd is None or not dist.is_main:
        return None
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops the events a killed run logged past its last checkpoint
    return SummaryWriter(str(rd.path / TENSORBOARD_DIR), purge_step=purge_step)


def log_tensorboard(writer: Any, rec: dict[str, Any]) -> None:
    """Scalars of one epoch record: epoch averages, subset loss / accuracy, margin min / mean / median."""
    step = rec["epoch"]
    for key in ("train_loss_epoch", "train_acc_epoch", "train_objective_epoch"):
        if rec.get(key) is not None:
            writer.add_scalar(f"epoch/{key.removesuffix('_epoch')}", rec[key], step)
    for split in ("train", "test"):
        if split not in rec:
            continue
        writer.add_scalar(f"{split}/loss", rec[split]["loss"], step)
        writer.add_scalar(f"{split}/acc", rec[split]["acc"], step)
        for name, st in rec[split]["margins"].items():
            for stat in ("min", "mean", "median"):
                writer.add_scalar(f"margin/{split}/{name}/{stat}", st[stat], step)
    writer.flush()


def postfix(rec: dict[str, Any]) -> dict[str, str]:
    """Progress-bar fields: loss, accuracy and the first estimator's min / mean margin (test if tracked)."""
    out = {}
    if "train_loss_epoch" in rec:
        out["loss"] = f"{rec['train_loss_epoch']:.4f}"
        out["acc"] = f"{rec['train_acc_epoch']:.3f}"
    split = "test" if "test" in rec else "train" if "train" in rec else None
    if split is not None and rec[split]["margins"]:
        name, st = next(iter(rec[split]["margins"].items()))
        out[f"{split} {name} min/mean"] = f"{st['min']:.3g}/{st['mean']:.3g}"
    return out
