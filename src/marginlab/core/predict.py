"""Batched prediction: a model's logits or predicted labels over many points, without gradients.

The one place marginlab runs a model over ``x [N, ...]`` batch by batch for its outputs alone. The
caller chooses the mode: these functions neither switch the model to eval mode nor back (a model with
batch norm or dropout should already be in eval mode, as every caller arranges).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Logits ``[N, K]`` of ``model`` on ``x [N, ...]``, in consecutive batches of ``batch_size`` points
    (the last one shorter), without gradients. ``device``: where each batch is moved before the model
    sees it (None: ``x`` as it is); the logits stay where the model put them."""
    batches = x.split(batch_size)
    return torch.cat([model(xb if device is None else xb.to(device)) for xb in batches])


def predict_labels(
    model: nn.Module, x: torch.Tensor, batch_size: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Predicted classes ``[N]`` (int64, the argmax of the logits ``[N, K]``) of ``model`` on ``x [N, ...]``,
    batched as :func:`predict_logits`."""
    return predict_logits(model, x, batch_size, device=device).argmax(1)
