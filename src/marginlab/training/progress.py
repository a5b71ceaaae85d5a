"""What a person watches during training: tqdm bars on a terminal, one log line per epoch elsewhere
(a file, nohup, a batch scheduler), and optional TensorBoard event files.

TensorBoard is never a hard dependency: ``train.tensorboard = true`` is checked when the config is built
and, if ``torch.utils.tensorboard`` does not import, fails with a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import sys
from typing import Any

from marginlab.base.deprecated import moved_attribute
from marginlab.base.distributed import DistContext
from marginlab.base.errors import ConfigError
from marginlab.base.logs import bars_allowed
from marginlab.lab.names import TENSORBOARD
from marginlab.lab.runs import RunDir
from marginlab.training.records import SPLITS, EpochRecord, MarginStat, Split

_BOARD_STATS: tuple[MarginStat, ...] = ("min", "mean", "median")  # margin statistics sent to TensorBoard


def __getattr__(name: str) -> Any:
    """The old ``TENSORBOARD_DIR`` (now ``marginlab.lab.names.TENSORBOARD``), with a DeprecationWarning."""
    return moved_attribute(__name__, name)


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
    return SummaryWriter(str(rd.path / TENSORBOARD), purge_step=purge_step)


def log_tensorboard(writer: Any, rec: EpochRecord) -> None:
    """Scalars of one epoch record: epoch averages, subset loss / accuracy, margin min / mean / median."""
    step = rec["epoch"]
    means = {
        "train_loss_epoch": rec.get("train_loss_epoch"),
        "train_acc_epoch": rec.get("train_acc_epoch"),
        "train_objective_epoch": rec.get("train_objective_epoch"),
    }
    for key, value in means.items():
        if value is not None:
            writer.add_scalar(f"epoch/{key.removesuffix('_epoch')}", value, step)
    for split in SPLITS:
        if split not in rec:
            continue
        split_rec = rec[split]
        writer.add_scalar(f"{split}/loss", split_rec["loss"], step)
        writer.add_scalar(f"{split}/acc", split_rec["acc"], step)
        for name, st in split_rec["margins"].items():
            for stat in _BOARD_STATS:
                writer.add_scalar(f"margin/{split}/{name}/{stat}", st[stat], step)
    writer.flush()


def on_terminal() -> bool:
    """Whether progress goes to a person watching (stderr is a terminal) rather than into a file."""
    return bars_allowed() and sys.stderr.isatty()


def postfix(rec: EpochRecord) -> dict[str, str]:
    """Progress-bar fields: loss, train / test accuracy and the first estimator's min / mean margin."""
    out = {}
    if "train_loss_epoch" in rec:
        out["loss"] = f"{rec['train_loss_epoch']:.4f}"
        out["train_acc"] = f"{rec['train_acc_epoch']:.3f}"
    if "test" in rec:
        out["test_acc"] = f"{rec['test']['acc']:.3f}"
    split: Split | None = "test" if "test" in rec else "train" if "train" in rec else None
    if split is not None and rec[split]["margins"]:
        name, st = next(iter(rec[split]["margins"].items()))
        out[f"{split} {name} min/mean"] = f"{st['min']:.3g}/{st['mean']:.3g}"
    return out


def epoch_line(rec: EpochRecord, epochs: int) -> str:
    """One log line for an epoch record::

    epoch 3/20  loss 0.2130  train acc 0.941  test acc 0.932  first-order (estimate) train min/mean
    -0.021/0.512  test min/mean -0.105/0.498  12.3 s
    """
    parts = [f"epoch {rec['epoch']}/{epochs}"]
    if "train_loss_epoch" in rec:
        parts.append(f"loss {rec['train_loss_epoch']:.4f}")
        parts.append(f"train acc {rec['train_acc_epoch']:.3f}")
    elif "train" in rec:
        parts.append(f"train acc {rec['train']['acc']:.3f}")
    if "test" in rec:
        parts.append(f"test acc {rec['test']['acc']:.3f}")
    margins = [
        (split, rec[split]["margins"]) for split in SPLITS if split in rec and rec[split].get("margins")
    ]
    if margins:
        name = next(iter(margins[0][1]))
        kind = margins[0][1][name].get("kind", "")
        stats = [
            f"{split} min/mean {m[name]['min']:.3g}/{m[name]['mean']:.3g}"
            for split, m in margins
            if name in m
        ]
        parts.append(f"{name} ({kind}) " + "  ".join(stats))
    seconds = sum(v for v in rec.get("time", {}).values() if isinstance(v, int | float))
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)
