"""scikit-learn's 8x8 digits (1,797 images, values 0..16): tiny, bundled, good for fast tests.

There is no official split, so a fixed one is used: a permutation from ``torch.Generator`` seeded with
:data:`SPLIT_SEED` puts :data:`TEST_SIZE` images in ``test`` and the rest in ``train``, each kept in the
original order. The split does not depend on the ``seed`` of :func:`load_dataset` (which only drives
subsampling), so train and test never overlap.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from marginlab.data.base import DATASETS, DatasetInfo, RawSplit, make_raw

SPLIT_SEED = 0
TEST_SIZE = 450  # a quarter of 1,797, rounded
CLASSES = tuple(str(d) for d in range(10))


def load_digits_split(split: str, data_dir: Path, download: bool) -> RawSplit:
    """One split of the 8x8 digits, ``x`` uint8 ``[N, 1, 8, 8]`` in 0..16 (scale 16)."""
    del data_dir, download  # bundled with scikit-learn
    return _splits()[split]


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, RawSplit]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None]  # exact: the values are integers 0..16
    y = bunch.target.astype(np.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED)).numpy()
    is_test = np.zeros(len(y), dtype=bool)
    is_test[perm[:TEST_SIZE]] = True
    source = f"scikit-learn load_digits (fixed split, seed {SPLIT_SEED})"
    return {
        split: make_raw(x[keep], y[keep], 16.0, source, "digits")
        for split, keep in (("train", ~is_test), ("test", is_test))
    }


DATASETS.add(
    "digits",
    DatasetInfo(
        name="digits",
        classes=CLASSES,
        shape=(1, 8, 8),
        description="scikit-learn 8x8 digits, 1,347 train / 450 test (fixed split)",
        load=load_digits_split,
    ),
)
