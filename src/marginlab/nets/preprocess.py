"""Input normalisation folded into a model as its first layer, so that inputs stay in [0, 1] pixel space.

A model trained on normalised inputs ``(x - mean) / std`` is evaluated as ``model ∘ Normalize``: attacks,
bounds and ε then all live in [0, 1] pixel space (as foolbox's ``preprocessing`` does), and the bound
propagation reads the layer as the affine map ``x / std - mean / std``
(:mod:`marginlab.bounds.network`). ``--preprocess`` gives the constants (:func:`parse_preprocess`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
from torch import nn

from marginlab.base.errors import ConfigError


class Preprocess(TypedDict):
    """The constants of :class:`Normalize`, one per channel or one for all (as recorded in a run)."""

    mean: list[float]
    std: list[float]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer: ``x [N, C, H, W]`` in [0, 1] ->
    the input scale the model was trained on. ``mean`` and ``std`` are buffers shaped ``[1, C, 1, 1]``
    (C = 1 broadcasts over every channel)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H, W]``."""
        return (x - self.mean) / self.std


def parse_preprocess(text: str | None) -> Preprocess | None:
    """``"mean=0.1307,std=0.3081"`` or ``"mean=0.49,0.48,0.45,std=0.25,0.24,0.26"`` -> ``{"mean": [...],
    "std": [...]}`` (an unset one is 0 / 1); ``None``, ``""`` or ``"none"`` -> ``None``."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    out: dict[str, list[float]] = {}
    key = None
    for token in (t.strip() for t in str(text).split(",")):
        if "=" in token:
            key, _, token = (s.strip() for s in token.partition("="))
            if key not in ("mean", "std") or key in out:
                raise ConfigError(f"--preprocess takes mean=... and std=... once each, got {key!r}")
            out[key] = []
        if key is None:
            raise ConfigError(f"--preprocess must look like mean=0.1307,std=0.3081, got {text!r}")
        try:
            out[key].append(float(token))
        except ValueError:
            raise ConfigError(f"--preprocess {key} values must be numbers, got {token!r}") from None
    mean, std = out.get("mean", [0.0]), out.get("std", [1.0])
    # torch.tensor makes float32: a mean or std beyond float32's range is inf here, and refused
    if not all(torch.isfinite(torch.tensor(mean + std))) or min(std) <= 0:
        raise ConfigError(f"--preprocess needs finite means and positive stds, got {text!r}")
    # Normalize holds float32 buffers: a std below float32's smallest normal number (e.g. 1e-300) would
    # become 0 there (or a subnormal without precision), making the logits inf or NaN on every point.
    f32 = torch.finfo(torch.float32)
    bad = next((s for s in std if not f32.tiny <= s <= f32.max), None)
    if bad is not None:
        raise ConfigError(
            f"--preprocess std {bad!r} is not a normal float32 number (the model computes in float32: "
            f"use a std in [{f32.tiny:.3g}, {f32.max:.3g}])"
        )
    return {"mean": mean, "std": std}
