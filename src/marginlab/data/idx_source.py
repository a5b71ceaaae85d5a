"""IDX datasets on disk: find a split's file pair, download it on request, read and cache it.

Shared by MNIST and Fashion-MNIST, which use the same file names and format. Decoded splits are cached
per process (keyed by path, size and mtime, so a replaced file is read again) as read-only uint8
arrays; callers build fresh float tensors from them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from marginlab.data.base import RawSplit, make_raw
from marginlab.data.checksums import OFFICIAL
from marginlab.data.download import download_first
from marginlab.data.idx import find_idx_pair, idx_stems, load_idx_pair
from marginlab.data.locate import file_key


def idx_split(
    dataset: str, split: str, dirs: Sequence[Path], *, download_to: Path | None, mirrors: Sequence[str]
) -> RawSplit | None:
    """The split from the first of ``dirs`` holding its IDX files, else from a download, else ``None``.

    Args:
        dataset: key into :data:`marginlab.data.checksums.OFFICIAL` (the files' checksums).
        download_to: where to download the split's two ``.gz`` files when none are found; ``None``
            means do not download.
        mirrors: base URLs (ending in ``/``) tried in order for downloads.
    """
    pair = find_idx_pair(dirs, split)
    if pair is None and download_to is not None:
        pair = download_idx(dataset, split, download_to, mirrors)
    if pair is None:
        return None
    return _read_cached(dataset, file_key(pair[0]), file_key(pair[1]))


def download_idx(dataset: str, split: str, dest_dir: Path, mirrors: Sequence[str]) -> tuple[Path, Path]:
    """Download the split's images and labels ``.gz`` files into ``dest_dir``, checking SHA-256."""
    paths = []
    for stem in idx_stems(split):
        dest = dest_dir / f"{stem}.gz"
        download_first([f"{m}{stem}.gz" for m in mirrors], dest, OFFICIAL[dataset][stem].gz)
        paths.append(dest)
    return paths[0], paths[1]


@functools.lru_cache(maxsize=8)
def _read_cached(
    dataset: str, images_key: tuple[str, int, int], labels_key: tuple[str, int, int]
) -> RawSplit:
    images_path, labels_path = Path(images_key[0]), Path(labels_key[0])
    x, y = load_idx_pair(images_path, labels_path, OFFICIAL.get(dataset))
    return make_raw(x, y, 255.0, f"IDX files {images_path} + {labels_path.name}", dataset)
