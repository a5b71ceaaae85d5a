"""The training state and its checkpoint: everything a resumed run needs to continue bit-for-bit.

One :class:`TrainingState` serves every experiment that resumes (``train``'s SGD loop and ``logreg-gd``'s
full-batch GD): the model's tensors, the optimizer state, the epoch just finished and the step count,
**every** random number generator the loop touches (torch CPU and CUDA, numpy, Python, the explicit
data-order generator; one state per rank), the training objective's own state per rank (its loss terms'
step counters and probe generators, an attack's random-start generator) and any other experiment-specific
values. It holds only what resume needs, so its size does not grow with the run: the metric records live
in ``metrics.jsonl``, which :func:`resume_state` cuts back to the checkpoint's epoch. Deterministic loops
leave what they lack empty (logreg-gd: (w, b) only, no optimizer, no RNG).

:func:`save_checkpoint` writes atomically (``fsio.atomic_torch_save``) at the end of every epoch, so a
``kill -9`` at any moment leaves either the previous or the new checkpoint, never a torn one.
:func:`load_checkpoint` uses ``torch.load(weights_only=True)``: numpy's RNG state is stored as plain
Python values and tensors so that no arbitrary pickle is ever executed. File layout (``FORMAT`` 2)::

    {"format": 2, "epoch": int, "step": int, "model": {name: tensor}, "optimizer": {...},
     "rng": [RngState per rank], "extra": {"objective": [ObjectiveState per rank], ...}}

Checkpoints written before training objectives existed hold ``"extra": {"regularizers": [state per loss
term]}`` instead (rank 0's): they still resume, the states going to the cross-entropy objective's terms.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch
from torch import nn

from marginlab.base.deprecated import moved_attribute
from marginlab.base.distributed import DistContext
from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import atomic_torch_save
from marginlab.lab.names import CONFIG
from marginlab.lab.runs import RunDir
from marginlab.training.objectives import Objective, ObjectiveState
from marginlab.training.regularizers import Regularizer, RegularizerState

FORMAT = 2  # bump when the layout changes; older checkpoints are refused with a clear message
_REGULARIZERS = "regularizers"  # the key of the loss terms' states inside the file's "extra" (old layout)
_OBJECTIVE = "objective"  # the key of the objective's states (one per rank) inside the file's "extra"


class NumpyRngState(TypedDict):
    """``np.random.get_state()`` as plain values; ``keys`` [624] int64 (the uint32 Mersenne state)."""

    kind: str
    keys: torch.Tensor
    pos: int
    has_gauss: int
    cached: float


class RngState(TypedDict):
    """One process's RNG streams: ``torch`` (CPU) and ``data`` (the data-order generator) are uint8
    state tensors, ``python`` is ``[version, internal state, gauss]``, ``cuda`` only on a GPU."""

    torch: torch.Tensor
    numpy: NumpyRngState
    python: list[Any]
    data: torch.Tensor
    cuda: NotRequired[torch.Tensor]


def capture_rng(data_gen: torch.Generator, device: torch.device) -> RngState:
    """The state of every RNG the loop uses, as tensors and plain Python values (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: RngState = {
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


def restore_rng(state: RngState, data_gen: torch.Generator, device: torch.device) -> None:
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
class TrainingState:
    """Everything a resumed run needs, as plain values and tensors (what a checkpoint file holds).

    Attributes:
        epoch: the last finished epoch (0 = only the initial evaluation was done).
        step: optimizer (or GD) steps taken so far.
        model: the model's ``state_dict`` (logreg-gd: ``w`` [D] and ``b`` [] in float64).
        optimizer: the optimizer's ``state_dict`` (``{}`` without an optimizer).
        rng: one :func:`capture_rng` state per rank (index = rank; ``[]`` for deterministic loops).
        regularizers: one :meth:`Regularizer.state_dict` per loss term, in the loop's order
            (``None``: a loop without loss terms, such as logreg-gd's GD, or one with an objective).
        objective: one :meth:`Objective.state_dict` per rank (``None``: written before objectives, or a
            loop without one).
        extra: other experiment-specific state, as plain values and tensors.
    """

    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] = field(default_factory=dict)
    rng: list[RngState] = field(default_factory=list)
    regularizers: list[RegularizerState] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    objective: list[ObjectiveState] | None = None

    @classmethod
    def capture(
        cls,
        epoch: int,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rng: list[RngState],
        regularizers: Sequence[Regularizer] = (),
        objective: Sequence[ObjectiveState] | None = None,
    ) -> TrainingState:
        """The state of a training loop's live objects (``rng``: every rank's :func:`capture_rng`;
        ``objective``: every rank's :meth:`Objective.state_dict`, which then replaces ``regularizers``)."""
        return cls(
            epoch=epoch,
            step=step,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            rng=rng,
            regularizers=[r.state_dict() for r in regularizers] if objective is None else None,
            objective=None if objective is None else list(objective),
        )

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        regularizers: Sequence[Regularizer],
        data_gen: torch.Generator,
        device: torch.device,
        rank: int,
        path: Path,
        objective: Objective | None = None,
    ) -> None:
        """Load this state into a training loop's live objects (inverse of :meth:`capture`); ``path``
        (the checkpoint file) is named in errors. ``objective``: gets this rank's state, or, from a
        checkpoint of the old layout, the loss terms' states (what :class:`CrossEntropy` keeps)."""
        load_model_state(model, self.model, path)
        try:
            optimizer.load_state_dict(self.optimizer)
        except (ValueError, KeyError) as e:
            raise RunDirError(f"checkpoint {path}: optimizer state does not fit ({e})") from None
        restore_rng(self.rng[rank], data_gen, device)
        for r, st in zip(regularizers, self.regularizers or [], strict=False):
            r.load_state_dict(st)
        if objective is not None and self.objective is not None:
            objective.load_state_dict(self.objective[rank])
        elif objective is not None and self.regularizers is not None:
            objective.load_state_dict({_REGULARIZERS: self.regularizers})


def save_checkpoint(path: str | Path, state: TrainingState) -> None:
    """Write ``state`` atomically to ``path`` (layout: the module docstring)."""
    extra = dict(state.extra)
    if state.regularizers is not None:
        extra[_REGULARIZERS] = state.regularizers
    if state.objective is not None:
        extra[_OBJECTIVE] = state.objective
    raw = {"format": FORMAT, "epoch": state.epoch, "step": state.step, "model": state.model}
    atomic_torch_save(raw | {"optimizer": state.optimizer, "rng": state.rng, "extra": extra}, path)


def load_checkpoint(path: str | Path) -> TrainingState:
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
        extra = dict(raw.get("extra", {}))
        regularizers = extra.pop(_REGULARIZERS, None)
        objective = extra.pop(_OBJECTIVE, None)
        return TrainingState(
            epoch=int(raw["epoch"]),
            step=int(raw["step"]),
            model=dict(raw["model"]),
            optimizer=dict(raw["optimizer"]),
            rng=list(raw["rng"]),
            regularizers=None if regularizers is None else [dict(st) for st in regularizers],
            extra=extra,
            objective=None if objective is None else [dict(st) for st in objective],
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
            f"checkpoint {path} does not fit the model of {CONFIG} ({first[:160]}); "
            "was the config edited after the run started?"
        ) from None


def resume_state(
    rd: RunDir, dist: DistContext | None = None
) -> tuple[TrainingState | None, list[dict[str, Any]]]:
    """``rd``'s checkpoint (``None``: there is none, the run starts over) and the metric records up to
    its epoch.

    A checkpoint with RNG states must be resumed by as many processes as wrote it. Rank 0 also makes
    the directory consistent with the checkpoint (:meth:`RunDir.rewind`): metric lines and per-point
    margin files a killed run wrote past it are dropped, temporary files removed.
    """
    dist = dist or DistContext()
    state = load_checkpoint(rd.checkpoint) if rd.checkpoint.is_file() else None
    if state is not None and state.rng and len(state.rng) != dist.world_size:
        raise ConfigError(
            f"{rd.path} was checkpointed by {len(state.rng)} process(es); "
            f"resume it with as many (now {dist.world_size})"
        )
    last = state.epoch if state is not None else -1
    if dist.is_main:
        return state, rd.rewind(last)
    return state, [r for r in rd.metrics() if int(r.get("epoch", -1)) <= last]


def restore_run(
    rd: RunDir | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    device: torch.device,
    dist: DistContext,
    regularizers: Sequence[Regularizer] = (),
    objective: Objective | None = None,
) -> tuple[TrainingState | None, list[dict[str, Any]]]:
    """:func:`resume_state`, then the state loaded into the training loop's model, optimizer, RNGs, loss
    terms and objective (:meth:`TrainingState.restore`). ``rd = None``: nothing to resume, ``(None, [])``."""
    if rd is None:
        return None, []
    state, records = resume_state(rd, dist)
    if state is not None:
        state.restore(model, optimizer, regularizers, data_gen, device, dist.rank, rd.checkpoint, objective)
    return state, records


def regularizer_state(r: Regularizer) -> RegularizerState:
    """Deprecated: use ``r.state_dict()``."""
    warnings.warn("regularizer_state(r) is deprecated; use r.state_dict()", DeprecationWarning, stacklevel=2)
    return r.state_dict()


def load_regularizer_state(r: Regularizer, st: RegularizerState) -> None:
    """Deprecated: use ``r.load_state_dict(st)``."""
    msg = "load_regularizer_state(r, st) is deprecated; use r.load_state_dict(st)"
    warnings.warn(msg, DeprecationWarning, stacklevel=2)
    r.load_state_dict(st)


def __getattr__(name: str) -> Any:
    """``Checkpoint`` is the old name of :class:`TrainingState` (deprecated alias)."""
    return moved_attribute(__name__, name)
