"""Checkpoints of the training loop: everything needed to continue bit-for-bit.

A checkpoint holds the model and optimizer state, **every** random number generator the loop touches
(torch CPU and CUDA, numpy, Python, and the explicit data-order generator), the epoch just finished, the
optimizer step count and the metric records so far. It is written atomically (``fsio.atomic_torch_save``)
at the end of every epoch, so a ``kill -9`` at any moment leaves either the previous or the new
checkpoint, never a torn one. Loading uses ``torch.load(weights_only=True)``: numpy's RNG state is stored
as plain Python values and tensors so that no arbitrary pickle is ever executed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from marginlab.distributed import DistContext
from marginlab.errors import ConfigError, RunDirError
from marginlab.fsio import atomic_torch_save
from marginlab.runs import RunDir
from marginlab.tracking import MARGINS_DIR

FORMAT = 1  # bump when the layout changes; older checkpoints are refused with a clear message


def capture_rng(data_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The state of every RNG the loop uses, as tensors and plain Python values (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": _python_state_to_plain(random.getstate()),
        "data": data_gen.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], data_gen: torch.Generator, device: torch.device) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached"]))
    random.setstate(_python_state_from_plain(state["python"]))
    data_gen.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _python_state_to_plain(st: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = st
    return [int(version), list(internal), gauss]


def _python_state_from_plain(st: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = st
    return (int(version), tuple(int(v) for v in internal), gauss)


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        epoch: the last finished epoch (0 = only the initial evaluation was done).
        step: optimizer steps taken so far.
        model: the model's ``state_dict``.
        optimizer: the optimizer's ``state_dict``.
        rng: one :func:`capture_rng` dict per rank (index = rank).
        records: the metric records logged so far (``metrics.jsonl`` is rewritten from them).
        extra: other loop state as plain values and tensors (e.g. regularizers' step counters).
    """

    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: list[dict[str, Any]]
    records: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically to ``path``."""
    atomic_torch_save(
        {
            "format": FORMAT,
            "epoch": ckpt.epoch,
            "step": ckpt.step,
            "model": ckpt.model,
            "optimizer": ckpt.optimizer,
            "rng": ckpt.rng,
            "records": ckpt.records,
            "extra": ckpt.extra,
        },
        path,
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; a corrupt file raises :class:`RunDirError`."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle; all mean "corrupt"
        raise RunDirError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to restart"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise RunDirError(f"checkpoint {path} has an unknown format; it was written by another version")
    return Checkpoint(
        epoch=int(raw["epoch"]),
        step=int(raw["step"]),
        model=raw["model"],
        optimizer=raw["optimizer"],
        rng=list(raw["rng"]),
        records=list(raw["records"]),
        extra=dict(raw.get("extra", {})),
    )


def restore_run(
    rd: RunDir | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    device: torch.device,
    dist: DistContext,
    regularizers: Sequence[Any] = (),
) -> Checkpoint | None:
    """Load ``rd``'s checkpoint into the model, optimizer, RNGs and regularizers (``None``: there is none).

    Rank 0 also makes the directory consistent with the checkpoint: ``metrics.jsonl`` is rewritten from
    its records (dropping lines a killed run logged past it) and later per-point margin files are removed.
    """
    ckpt = load_checkpoint(rd.checkpoint) if rd is not None and rd.checkpoint.is_file() else None
    if ckpt is not None and len(ckpt.rng) != dist.world_size:
        raise ConfigError(
            f"{rd.path if rd else ''} was checkpointed by {len(ckpt.rng)} process(es); "
            f"resume it with as many (now {dist.world_size})"
        )
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        restore_rng(ckpt.rng[dist.rank], data_gen, device)
        for r, st in zip(regularizers, ckpt.extra.get("regularizers", []), strict=False):
            load_regularizer_state(r, st)
    if rd is not None and dist.is_main:
        rd.rewrite_metrics(ckpt.records if ckpt else [])
        last = ckpt.epoch if ckpt else -1
        for path in (rd.path / MARGINS_DIR).glob("epoch-*.npz"):
            if int(path.stem.split("-")[1]) > last:
                path.unlink()
    return ckpt


def regularizer_state(r: Any) -> dict[str, Any]:
    """A regularizer's mutable state: its ``state_dict()`` if it has one, else its step counter."""
    if hasattr(r, "state_dict"):
        return dict(r.state_dict())
    return {"step": int(r.step)} if hasattr(r, "step") else {}


def load_regularizer_state(r: Any, st: dict[str, Any]) -> None:
    if hasattr(r, "load_state_dict"):
        r.load_state_dict(st)
    elif "step" in st:
        r.step = int(st["step"])
