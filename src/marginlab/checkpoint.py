"""Checkpoints of the training loop: everything needed to continue bit-for-bit.

A checkpoint holds the model and optimizer state, **every** random number generator the loop touches
(torch CPU and CUDA, numpy, Python, and the explicit data-order generator), the epoch just finished and
the optimizer step count: only what resume needs, so its size does not grow with the run (the metric
records live in ``metrics.jsonl``, which resume cuts back to the checkpoint's epoch). It is written
atomically (``fsio.atomic_torch_save``) at the end of every epoch, so a ``kill -9`` at any moment
leaves either the previous or the new checkpoint, never a torn one. Loading uses
``torch.load(weights_only=True)``: numpy's RNG state is stored as plain Python values and tensors so
that no arbitrary pickle is ever executed. The logistic-regression experiment stores its (w, b) the same
way (no optimizer, no RNG: full-batch GD is deterministic).
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

FORMAT = 2  # bump when the layout changes; older checkpoints are refused with a clear message


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
        rng: one :func:`capture_rng` dict per rank (index = rank; empty for deterministic loops).
        extra: other loop state as plain values and tensors (e.g. regularizers' step counters).
    """

    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: list[dict[str, Any]]
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
    try:
        return Checkpoint(
            epoch=int(raw["epoch"]),
            step=int(raw["step"]),
            model=dict(raw["model"]),
            optimizer=dict(raw["optimizer"]),
            rng=list(raw["rng"]),
            extra=dict(raw.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError):
        raise RunDirError(f"checkpoint {path} is incomplete; delete it to restart") from None


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's model state, naming the file when it does not fit the configured model
    (e.g. config.json edited to another architecture)."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunDirError(
            f"checkpoint {path} does not fit the model of config.json ({first[:160]}); "
            "was the config edited after the run started?"
        ) from None


def restore_run(
    rd: RunDir | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    device: torch.device,
    dist: DistContext,
    regularizers: Sequence[Any] = (),
) -> tuple[Checkpoint | None, list[dict[str, Any]]]:
    """Load ``rd``'s checkpoint into the model, optimizer, RNGs and regularizers.

    Returns the checkpoint (``None``: there is none) and the metric records up to its epoch.

    Rank 0 also makes the directory consistent with the checkpoint (:meth:`RunDir.rewind`): metric
    lines and per-point margin files a killed run wrote past it are dropped, temporary files removed.
    """
    ckpt = load_checkpoint(rd.checkpoint) if rd is not None and rd.checkpoint.is_file() else None
    if ckpt is not None and len(ckpt.rng) != dist.world_size:
        raise ConfigError(
            f"{rd.path if rd else ''} was checkpointed by {len(ckpt.rng)} process(es); "
            f"resume it with as many (now {dist.world_size})"
        )
    if ckpt is not None:
        assert rd is not None
        load_model_state(model, ckpt.model, rd.checkpoint)
        try:
            optimizer.load_state_dict(ckpt.optimizer)
        except (ValueError, KeyError) as e:
            raise RunDirError(f"checkpoint {rd.checkpoint}: optimizer state does not fit ({e})") from None
        restore_rng(ckpt.rng[dist.rank], data_gen, device)
        for r, st in zip(regularizers, ckpt.extra.get("regularizers", []), strict=False):
            load_regularizer_state(r, st)
    last = ckpt.epoch if ckpt else -1
    if rd is None:
        return ckpt, []
    if dist.is_main:
        return ckpt, rd.rewind(last)
    return ckpt, [r for r in rd.metrics() if int(r.get("epoch", -1)) <= last]


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
