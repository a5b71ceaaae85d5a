"""What one training step minimises: the :class:`Objective` of a recipe.

The training loop (:mod:`marginlab.training.loop`) asks the recipe's objective, per minibatch, for a
:class:`StepLoss` and back-propagates its ``objective``. The poster's recipes (``standard``,
``constraint``, ``regularized``) share :class:`CrossEntropy`: the mean cross-entropy of the clean batch
plus the weighted loss terms of :mod:`marginlab.training.regularizers`. The training methods a reviewer
compares them with (adversarial training, TRADES, MMA, the large-margin loss, certified training) are
other objectives registered in :data:`OBJECTIVES`; which objective and terms a recipe uses is
:mod:`marginlab.training.recipes`' business.

Contract of an objective (every one is checked against it by the tests):

- ``net(x) -> (features [B,F], logits [B,K])`` is the module the loop back-propagates through (possibly
  wrapped for data parallelism); ``model`` is the bare model (``model(x) -> logits [B,K]``), for inner
  maximisations (attacks) whose gradients must not be synchronised across ranks. ``x [B,C,H,W]`` lies in
  the image box [0, 1]; ``y [B]`` int64.
- :class:`StepLoss.ce` is the mean cross-entropy of the *clean* batch and ``logits`` the clean logits
  (the loop logs them as the training loss and accuracy, comparable across recipes); ``objective`` is
  what the step minimises; ``terms`` are the weighted parts beside it, logged by name.
- Randomness (random starts of attacks) comes from the objective's own generator, saved by
  :meth:`Objective.state_dict`, so a resumed run continues bit for bit; the model is left in train mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.base.registry import Registry
from marginlab.training.regularizers import Regularizer

# An objective's mutable state for a checkpoint: plain Python values and tensors only (``weights_only``-safe).
ObjectiveState = dict[str, Any]
# The dataset families that published reference settings exist for (Fashion-MNIST borrows MNIST's).
_DATASET_FAMILY = {"mnist": "mnist", "fashion-mnist": "mnist", "cifar10": "cifar"}


def dataset_family(dataset: str | None) -> str | None:
    """``"mnist"`` or ``"cifar"`` for a dataset spec (``"mnist:0,1"`` too) with published reference
    settings, else ``None`` (digits, user data: the caller asks for explicit values)."""
    if dataset is None:
        return None
    return _DATASET_FAMILY.get(dataset.split(":", 1)[0].lower())


def full_precision(x: Tensor) -> AbstractContextManager[None]:
    """A context in which losses on ``x``'s device run in float32 even inside the loop's mixed-precision
    ``torch.autocast`` (``train.amp``): only the network's forward passes run in bfloat16."""
    return torch.autocast(x.device.type, enabled=False)


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is when it asks for a step's loss (schedules such as an ε ramp read it).

    ``epoch``: the epoch being trained, 0-based; ``step``: optimizer steps taken before this one, over the
    whole run; ``steps_per_epoch`` and ``epochs``: the run's length; ``index [B]``: the batch's indices
    into the training set (per-example state such as MMA's radii; ``None`` where unknown).
    """

    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int
    index: Tensor | None = None

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.steps_per_epoch * self.epochs

    @property
    def fraction(self) -> float:
        """Share of the run's steps taken before this one, in [0, 1)."""
        return self.step / max(self.total_steps, 1)


@dataclass
class StepLoss:
    """One step's loss: ``objective`` (scalar, back-propagated), ``ce`` (scalar: mean cross-entropy of
    the clean batch), ``logits [B,K]`` (clean, for the accuracy) and ``terms`` (name -> weighted scalar,
    the parts logged beside the cross-entropy; their names are :meth:`Objective.term_names`)."""

    objective: Tensor
    ce: Tensor
    logits: Tensor
    terms: dict[str, Tensor]


@dataclass(frozen=True)
class BuildContext:
    """What an objective may need beside its parameters: the run's ``dataset`` spec (``"mnist"``...) and
    ``model_name`` (for reference values that depend on them), the run's ``seed`` (for its own
    generator) and the recipe's loss terms ``regularizers``."""

    dataset: str | None = None
    model_name: str | None = None
    seed: int = 0
    regularizers: tuple[Regularizer, ...] = ()


class Objective(ABC):
    """What a training step minimises (see the module docstring for the contract).

    Construction is two-step, so that ``config.json`` records every value that ran: :meth:`resolve_params`
    checks the user's ``params`` (unknown keys, types, ranges: :class:`ConfigError`, one line) and fills
    every unset one with its reference value; :meth:`build` makes the objective from resolved params.
    """

    name: ClassVar[str] = ""

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], ctx: BuildContext) -> dict[str, Any]:
        """``params`` checked and completed with reference values; the base class takes none."""
        if params:
            raise ConfigError(
                f"training objective {cls.name!r} takes no regularizer.params, got {sorted(params)}"
            )
        return {}

    @classmethod
    @abstractmethod
    def build(cls, params: Mapping[str, Any], ctx: BuildContext) -> Objective:
        """The objective for resolved ``params`` (the output of :meth:`resolve_params`)."""

    @abstractmethod
    def term_names(self) -> tuple[str, ...]:
        """Names of the logged terms of :class:`StepLoss`, in a fixed order."""

    @abstractmethod
    def __call__(self, net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, at: StepInfo) -> StepLoss:
        """The loss of the batch ``x [B,C,H,W]``, ``y [B]`` at ``at``."""

    def state_dict(self) -> ObjectiveState:
        """Internal state to checkpoint (generators, counters); stateless objectives return ``{}``."""
        return {}

    def load_state_dict(self, state: ObjectiveState) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None


OBJECTIVES: Registry[type[Objective]] = Registry("training objective")


@OBJECTIVES.register("cross-entropy")
class CrossEntropy(Objective):
    """The poster's recipes: ``mean CE(net(x), y) + sum_r r(model, features, logits, y)`` on the clean
    batch, with the weighted terms of ``regularizers`` (none: standard training)."""

    name = "cross-entropy"

    def __init__(self, regularizers: Sequence[Regularizer] = ()) -> None:
        self.regularizers = list(regularizers)

    @classmethod
    def build(cls, params: Mapping[str, Any], ctx: BuildContext) -> CrossEntropy:
        """Cross-entropy with the recipe's loss terms ``ctx.regularizers``."""
        return cls(ctx.regularizers)

    def term_names(self) -> tuple[str, ...]:
        """One name per regularizer, in order."""
        return tuple(r.name for r in self.regularizers)

    def __call__(self, net: nn.Module, model: nn.Module, x: Tensor, y: Tensor, at: StepInfo) -> StepLoss:
        """Clean cross-entropy plus the regularizers' terms."""
        feats, logits = net(x)
        feats, logits = feats.float(), logits.float()  # losses and regularizers in float32
        with full_precision(x):  # the regularizers' own products (W Wᵀ) too, as before objectives
            ce = F.cross_entropy(logits, y)
            terms = [r(model, feats, logits, y) for r in self.regularizers]
            objective = ce + sum(terms, torch.zeros((), device=x.device))
        return StepLoss(objective, ce, logits, dict(zip(self.term_names(), terms, strict=True)))

    def state_dict(self) -> ObjectiveState:
        """The regularizers' states, in order."""
        return {"regularizers": [r.state_dict() for r in self.regularizers]}

    def load_state_dict(self, state: ObjectiveState) -> None:
        """Restore every regularizer's state."""
        for r, st in zip(self.regularizers, state.get("regularizers", []), strict=False):
            r.load_state_dict(st)
