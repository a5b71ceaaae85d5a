"""CIFAR-10 from its official releases (there is no offline copy; users bring the files).

Looked for in ``<data_dir>`` and ``<data_dir>/cifar10/``, in this order:

1. ``cifar-10-batches-bin/`` -- the binary release: ``data_batch_1.bin`` .. ``data_batch_5.bin`` (train)
   and ``test_batch.bin``; each record is 1 label byte then 3,072 pixel bytes (R, G, B planes of 32x32).
2. ``cifar-10-batches-py/`` -- the python release, read with the numpy-only unpickler.
3. ``cifar-10-binary.tar.gz`` -- the binary tarball, SHA-256 checked, its batch files read straight from
   the archive into memory (nothing is written to disk, so hostile member paths cannot escape).

``download=True`` fetches the tarball into ``<data_dir>/cifar10/`` when nothing is found.
"""

from __future__ import annotations

import functools
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from marginlab.base.errors import DataError
from marginlab.data import checksums
from marginlab.data.base import DATASETS, DatasetInfo, RawSplit, make_raw
from marginlab.data.download import download
from marginlab.data.locate import dataset_dirs, file_key
from marginlab.data.safe_pickle import load_numpy_pickle

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
TARBALL = "cifar-10-binary.tar.gz"
BIN_DIR, PY_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
RECORD = 1 + 3 * 32 * 32
MAX_RECORDS = 50_000  # per file; refuses absurd archive members before reading them
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar10(split: str, data_dir: Path, download_missing: bool) -> RawSplit:
    """One CIFAR-10 split, ``x`` uint8 ``[N, 3, 32, 32]`` (channels R, G, B)."""
    roots = dataset_dirs(data_dir, "cifar10")
    for root in roots:
        if (root / BIN_DIR).is_dir():
            return _read_dir(root / BIN_DIR, split, binary=True)
        if (root / PY_DIR).is_dir():
            return _read_dir(root / PY_DIR, split, binary=False)
    tar = next((r / TARBALL for r in roots if (r / TARBALL).is_file()), None)
    if tar is None and download_missing:
        tar = download(URL, data_dir / "cifar10" / TARBALL, checksums.CIFAR10_BINARY_TAR_SHA256)
    if tar is not None:
        return _read_tarball(file_key(tar))[split]
    raise DataError(
        f"CIFAR-10 not found: put {BIN_DIR}/ (data_batch_1.bin .. data_batch_5.bin, test_batch.bin) or "
        f"{TARBALL} in {data_dir / 'cifar10'} (download it from {URL}), or pass download=True"
    )


def parse_binary_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode binary-release records: images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64."""
    if not data or len(data) % RECORD:
        raise DataError(
            f"{where} is truncated or not a CIFAR-10 binary batch: {len(data)} bytes is not a positive "
            f"multiple of the {RECORD}-byte record; replace it"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    return _checked(records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64), where)


def _parse_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a python-release batch: a pickled dict with ``data`` [N, 3072] uint8 and ``labels``."""
    with open(path, "rb") as f:
        batch = load_numpy_pickle(f, str(path))
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch (no dict inside); replace it")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != RECORD - 1:
        raise DataError(f"{path}: expected 'data' of shape [N, 3072]; replace it")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(type(v) is int for v in labels):
        raise DataError(f"{path}: expected 'labels', a list of {len(data)} ints; replace it")
    return _checked(data.astype(np.uint8).reshape(-1, 3, 32, 32), np.array(labels, np.int64), str(path))


def _checked(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if y.size and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise DataError(f"{where}: label {int(y.max())} is outside 0..9; is it a CIFAR-100 file?")
    return x, y


def _read_dir(directory: Path, split: str, *, binary: bool) -> RawSplit:
    names = [n + ".bin" if binary else n for n in FILES[split]]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise DataError(f"{', '.join(missing)} missing from {directory}; copy the complete release there")
    return _read_files(tuple(file_key(directory / n) for n in names), binary)


@functools.lru_cache(maxsize=4)
def _read_files(keys: tuple[tuple[str, int, int], ...], binary: bool) -> RawSplit:
    paths = [Path(k[0]) for k in keys]
    parts = [parse_binary_batch(p.read_bytes(), str(p)) if binary else _parse_python_batch(p) for p in paths]
    release = "binary" if binary else "python"
    source = f"CIFAR-10 {release} release {paths[0].parent} ({', '.join(p.name for p in paths)})"
    return make_raw(
        np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), 255.0, source, "cifar10"
    )


@functools.lru_cache(maxsize=1)
def _read_tarball(key: tuple[str, int, int]) -> dict[str, RawSplit]:
    path = Path(key[0])
    checksums.check_sha256(
        checksums.sha256_file(path),
        checksums.CIFAR10_BINARY_TAR_SHA256,
        str(path),
        f"download it again from {URL}",
    )
    wanted = {n + ".bin" for names in FILES.values() for n in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not (member.isfile() and len(parts) == 2 and parts[0] == BIN_DIR and parts[1] in wanted):
                    continue  # skip links, directories and anything else: only the batch files are read
                if parts[1] in found or member.size > MAX_RECORDS * RECORD:
                    raise DataError(
                        f"{path}: member {member.name} is repeated or too large; replace the archive"
                    )
                f = tar.extractfile(member)
                assert f is not None  # regular files always have contents
                found[parts[1]] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"{path} is a corrupt or truncated archive ({e}); download it again from {URL}"
        ) from None
    out = {}
    for split, names in FILES.items():
        missing = [n + ".bin" for n in names if n + ".bin" not in found]
        if missing:
            raise DataError(f"{path} lacks {BIN_DIR}/{', '.join(missing)}; download it again from {URL}")
        batches = [parse_binary_batch(found[n + ".bin"], f"{path}:{n}.bin") for n in names]
        x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
        out[split] = make_raw(x, y, 255.0, f"CIFAR-10 binary tarball {path}", "cifar10")
    return out


DATASETS.add(
    "cifar10",
    DatasetInfo(
        name="cifar10",
        classes=CLASSES,
        shape=(3, 32, 32),
        description="CIFAR-10 colour photos, 32x32 RGB, 50,000 train / 10,000 test (bring your own files)",
        load=load_cifar10,
    ),
)
