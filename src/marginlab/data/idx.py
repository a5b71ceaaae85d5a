"""Reader for IDX files (the MNIST / Fashion-MNIST format), raw or gzip-compressed.

An IDX file is a big-endian header -- two zero bytes, a type code (``0x08`` = unsigned byte), the
number of dimensions ``d`` -- then ``d`` 32-bit sizes, then the data. Images are ``idx3`` files
(magic 2051 = ``0x00000803``), labels ``idx1`` files (magic 2049). The file size must match the header
exactly: a short file is truncated, a long one is not what its header says it is.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from marginlab.base.errors import DataError
from marginlab.data.checksums import FileSums, check_sha256, sha256_bytes

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_UBYTE = 0x08


def read_file_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when it is a gzip file (detected by its magic, not its name)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is a corrupt or truncated gzip file ({e}); replace it") from None


def parse_idx(data: bytes, magic: int, where: str) -> np.ndarray:
    """Decode IDX bytes whose magic number must be ``magic``; returns a uint8 array of the header shape."""
    if len(data) < 4:
        raise DataError(f"{where} is truncated: {len(data)} bytes, too short for an IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"{where} has magic number {found:#010x}, expected {magic:#010x} "
            f"({'images' if magic == IMAGES_MAGIC else 'labels'}); is it the right file?"
        )
    assert data[2] == _UBYTE  # implied by the magic check: both magics use the ubyte type code
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where} is truncated inside its header ({len(data)} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        problem = "is truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{where} {problem}: {len(data)} bytes, but its header {dims} needs {expected}; replace it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: Path, magic: int, sums: FileSums | None = None) -> np.ndarray:
    """Read one IDX file (raw or ``.gz``); with ``sums``, also check its decompressed SHA-256."""
    data = read_file_bytes(path)
    if sums is not None:
        check_sha256(sha256_bytes(data), sums.raw, str(path), "delete it and get the official file again")
    return parse_idx(data, magic, str(path))


def find_file(dirs: Iterable[Path], stem: str) -> Path | None:
    """The first ``dir/stem`` or ``dir/stem.gz`` that exists, searching ``dirs`` in order."""
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def idx_stems(split: str) -> tuple[str, str]:
    """File stems (without ``.gz``) of the images and labels of ``split`` in the MNIST naming."""
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def find_idx_pair(dirs: Sequence[Path], split: str) -> tuple[Path, Path] | None:
    """Images and labels files of ``split`` from the first directory that holds either.

    Returns ``None`` when no directory holds either file; raises :class:`DataError` when a directory
    holds one without the other (a half-copied dataset should not silently fall back elsewhere).
    """
    img_stem, lab_stem = idx_stems(split)
    for d in dirs:
        images, labels = find_file([d], img_stem), find_file([d], lab_stem)
        if images and labels:
            return images, labels
        if images or labels:
            missing = lab_stem if images else img_stem
            raise DataError(f"{missing}[.gz] is missing from {d} (its partner file is there); add it")
    return None


def load_idx_pair(
    images_path: Path, labels_path: Path, sums: dict[str, FileSums] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 1, H, W]`` uint8 and labels ``[N]`` int64 from an IDX pair, checksummed if ``sums``."""

    def stem(p: Path) -> str:
        return p.name.removesuffix(".gz")

    images = read_idx(images_path, IMAGES_MAGIC, sums.get(stem(images_path)) if sums else None)
    labels = read_idx(labels_path, LABELS_MAGIC, sums.get(stem(labels_path)) if sums else None)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path}: expected [N, H, W] images and [N] labels, got {images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    return images[:, None], labels.astype(np.int64)
