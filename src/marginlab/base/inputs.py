"""The checks both API entry points make on what a user hands them (``estimate_margins`` and
``robust_accuracy``): one place, so the two never disagree on what a valid input is.

- images: a float tensor or numpy array ``[N, C, H, W]`` in [0, 1]; ``[N, H, W]`` (grey) gains its channel
  axis; flattened ``[N, D]`` inputs are refused unless an ``input_shape`` says how to unflatten them;
  integer images (0-255) are refused with the fix;
- labels: integers ``[N]`` (numpy, lists and integral floats accepted), within the model's classes;
- models whose logits are NaN or infinite on any point are refused, naming how many points: a NaN logit
  makes every margin +inf and every attack fail, so the numbers would look like results;
- models that output probabilities (rows in [0, 1] summing to 1) are refused: every margin and attack
  here is defined on logits, and a softmax output makes them silently wrong (about 10x too small margins,
  saturated cross-entropy);
- a model in train mode is evaluated in eval mode, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError

log = logging.getLogger(__name__)

ArrayInput: TypeAlias = Tensor | npt.ArrayLike
"""What the API entry points take for points or labels: a tensor, a numpy array or (nested) lists."""


def prepare_inputs(
    x: ArrayInput, y: ArrayInput, input_shape: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """``(x float [N, C, H, W], y int64 [N])`` from tensors, arrays or lists; one-line errors otherwise."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if not x.is_floating_point():
        raise ConfigError(
            f"inputs must be floats in [0, 1], got {x.dtype} (divide 0-255 images by 255 first)"
        )
    if x.dtype != torch.float32 and x.dtype != torch.float64:
        x = x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)  # [N, H, W] grey images
    elif x.ndim == 2:
        if input_shape is None:
            raise ConfigError(
                f"inputs are flattened {tuple(x.shape)}; give them as [N, C, H, W], "
                f"e.g. x.reshape(-1, 1, 28, 28) for MNIST"
            )
        x = x.reshape(len(x), *input_shape)
    if x.ndim != 4:
        raise ConfigError(f"inputs must be [N, C, H, W], got shape {tuple(x.shape)}")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise ConfigError("labels must be class indices (integers), got non-integral floats")
        y = y.long()
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(f"labels must be [N] with N={len(x)}, got shape {tuple(y.shape)}")
    if len(x) == 0:
        raise ConfigError("no points given (N = 0)")
    if bool(torch.isnan(x).any()) or bool(x.min() < 0) or bool(x.max() > 1):
        raise ConfigError("inputs must lie in [0, 1] (pixel space; fold any normalisation into the model)")
    return x, y.long()


def check_model_outputs(logits: Tensor, y: Tensor, tol: float = 1e-5) -> None:
    """Refuse non-finite logits, probability outputs and labels outside the model's classes
    (``logits [N, K]`` of every point evaluated, ``y [N]``): the one check of what a model outputs."""
    if logits.ndim != 2:
        raise ConfigError(f"the model must return logits [N, K], got shape {tuple(logits.shape)}")
    check_finite_logits(logits)
    k = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ConfigError(f"labels must lie in [0, {k - 1}] for this {k}-class model")
    in_range = bool(logits.min() > -tol) and bool(logits.max() < 1 + tol)
    if in_range and bool(((logits.sum(1) - 1).abs() < tol).all()):
        raise ConfigError(
            "the model outputs probabilities (rows in [0, 1] summing to 1), not logits: remove its final "
            "softmax; margins and attacks are defined on logits"
        )


def check_finite_logits(logits: Tensor) -> None:
    """Refuse logits ``[N, K]`` that are NaN or infinite on any point, naming how many points gave them.

    Every margin, attack and accuracy compares logits: with a NaN among them no attack ever succeeds and
    every margin is +inf, so a broken model (NaN weights from the checkpoint, a normalisation that
    overflows, code that divides by zero) would pass as a perfectly robust one."""
    bad = int((~torch.isfinite(logits)).flatten(1).any(1).sum()) if logits.numel() else 0
    if bad:
        raise ConfigError(
            f"the model's logits are not finite (NaN or inf) on {bad} of {len(logits)} points; "
            "check its weights, its input normalisation (--preprocess) and its code"
        )


def check_train_mode(model: nn.Module) -> str | None:
    """The warning for a model left in train mode (it is evaluated in eval mode), or ``None``."""
    if not model.training:
        return None
    return (
        "the model was in train mode (dropout/batch-norm make margins and attacks unreliable); "
        "evaluated it in eval mode"
    )
