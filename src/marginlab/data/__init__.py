"""Every dataset marginlab knows, behind one function.

>>> ds = load_dataset("mnist:0,1", "train", labels="pm1", n=1000, seed=0)   # doctest: +SKIP
>>> ds.x.shape, ds.y.unique()                                                # doctest: +SKIP
(torch.Size([1000, 1, 28, 28]), tensor([-1,  1]))

Datasets (``DATASETS.names()``): ``mnist``, ``fashion-mnist``, ``cifar10``, ``digits``; see each module
for where its files are looked for. Images are float32 ``[N, C, H, W]`` in [0, 1], labels int64 ``[N]``.
"""

from marginlab.data import cifar10, digits, fashion, mnist  # noqa: F401  (each registers its dataset)
from marginlab.data.api import clear_cache, load_dataset, load_points
from marginlab.data.base import DATASETS, SPLITS, Dataset, DatasetInfo, RawSplit, data_dir_default

__all__ = [
    "DATASETS",
    "SPLITS",
    "Dataset",
    "DatasetInfo",
    "RawSplit",
    "clear_cache",
    "data_dir_default",
    "load_dataset",
    "load_points",
]
