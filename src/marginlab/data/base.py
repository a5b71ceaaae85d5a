"""The dataset value type, the ``DATASETS`` registry and the data directory.

Each dataset module registers a :class:`DatasetInfo` whose ``load`` returns a :class:`RawSplit`: the
whole split as integer pixels (``uint8`` numpy ``[N, C, H, W]``) plus a divisor that maps them to
[0, 1]. Keeping the raw integers lets loaders cache one compact copy per process; the float tensors
handed to users are always built fresh by :func:`marginlab.data.load_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from marginlab.base.errors import DataError
from marginlab.base.registry import Registry

SPLITS = ("train", "test")
ENV_VAR = "MARGINLAB_DATA"


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset (optionally a class subset), ready for training or evaluation.

    Attributes:
        x: images, float32 ``[N, C, H, W]`` in [0, 1]; a fresh tensor owned by the caller.
        y: labels, int64 ``[N]``: ``0..k-1`` in the order of ``classes``, or -1/+1 with ``labels="pm1"``.
        classes: human-readable name of each label index of this task (``k`` names).
        name: the dataset's registry name (``"mnist"``, ``"fashion-mnist"``, ...).
        split: ``"train"`` or ``"test"``.
        source: which files or bundle the data came from (a path and its kind).
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    name: str
    split: str
    source: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        """The number of classes K (labels lie in 0..K-1)."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.x.shape[1:])}, classes={self.classes!r}, source={self.source!r})"
        )


@dataclass(frozen=True)
class RawSplit:
    """A whole split as stored: ``x`` uint8 ``[N, C, H, W]`` (read-only), ``y`` int64 ``[N]``.

    Pixel values in [0, 1] are ``x / scale``; ``source`` says where the data came from.
    """

    x: np.ndarray
    y: np.ndarray
    scale: float
    source: str


Loader = Callable[[str, Path, bool], RawSplit]  # (split, data_dir, download) -> RawSplit


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about a dataset: its classes, image shape and loader."""

    name: str
    classes: tuple[str, ...]
    shape: tuple[int, int, int]
    description: str
    load: Loader


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def get_info(name: str) -> DatasetInfo:
    """The registered dataset called ``name``; unknown names raise :class:`DataError`."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS.names())}")
    return DATASETS.get(name)


def check_split(split: str) -> None:
    """Refuse a split name other than those of :data:`SPLITS` with :class:`DataError`."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")


def data_dir_default(data_dir: str | Path | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$MARGINLAB_DATA``, else ``~/.marginlab/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".marginlab" / "data"


def make_raw(x: np.ndarray, y: np.ndarray, scale: float, source: str, what: str) -> RawSplit:
    """Check shapes and label range, mark the arrays read-only (they may be cached) and wrap them."""
    assert x.ndim == 4 and y.ndim == 1, (x.shape, y.shape)  # loaders reshape; a mismatch is a bug
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{what}: {x.shape[0]} images but {y.shape[0]} labels (from {source})")
    x = np.ascontiguousarray(x, dtype=np.uint8)
    y = np.ascontiguousarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return RawSplit(x=x, y=y, scale=scale, source=source)
