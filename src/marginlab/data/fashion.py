"""Fashion-MNIST (Zalando): 28x28 grey images of clothing, 60k/10k, in the MNIST IDX format.

Searched in ``<data_dir>/fashion-mnist/``, then the Debian package path
``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``). Every file is checked against
the SHA-256 of the official contents; ``download=True`` fetches the ``.gz`` files into
``<data_dir>/fashion-mnist/`` when none are found.
"""

from __future__ import annotations

from pathlib import Path

from marginlab.base.errors import DataError
from marginlab.data.base import DATASETS, DatasetInfo, RawSplit
from marginlab.data.idx import idx_stems
from marginlab.data.idx_source import idx_split

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRRORS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


def load_fashion(split: str, data_dir: Path, download: bool) -> RawSplit:
    """One Fashion-MNIST split, ``x`` uint8 ``[N, 1, 28, 28]``."""
    # Not data_dir itself: MNIST's files have the same names and may live there.
    dirs = [data_dir / "fashion-mnist", DEBIAN_DIR]
    target = data_dir / "fashion-mnist" if download else None
    raw = idx_split("fashion-mnist", split, dirs, download_to=target, mirrors=MIRRORS)
    if raw is not None:
        return raw
    img, lab = idx_stems(split)
    raise DataError(
        f"Fashion-MNIST not found: put {img}.gz and {lab}.gz in {data_dir / 'fashion-mnist'}, "
        f"install the Debian package dataset-fashion-mnist ({DEBIAN_DIR}), "
        f"or pass download=True to fetch them from {MIRRORS[0]}"
    )


DATASETS.add(
    "fashion-mnist",
    DatasetInfo(
        name="fashion-mnist",
        classes=CLASSES,
        shape=(1, 28, 28),
        description="Zalando clothing images, 28x28 grey, 60,000 train / 10,000 test",
        load=load_fashion,
    ),
)
