"""File formats of the data layer, on small files written into tmp_path: IDX, the numpy-only unpickler,
CIFAR-10 binary / python batches and tarball, and verified downloads."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import idx_bytes
from marginlab.base.errors import DataError
from marginlab.data import checksums, load_dataset
from marginlab.data.download import download
from marginlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, find_idx_pair, read_idx
from marginlab.data.safe_pickle import load_numpy_pickle

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_reads_raw_and_gz(tmp_path: Path, compress: bool) -> None:
    images = RNG.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    data = idx_bytes(images, IMAGES_MAGIC)
    path = tmp_path / ("f.gz" if compress else "f")
    path.write_bytes(gzip.compress(data) if compress else data)
    np.testing.assert_array_equal(read_idx(path, IMAGES_MAGIC), images)


def test_idx_checksum_of_contents(tmp_path: Path) -> None:
    data = idx_bytes(np.arange(6, dtype=np.uint8), LABELS_MAGIC)
    (tmp_path / "l.gz").write_bytes(gzip.compress(data))
    good = checksums.FileSums(raw=hashlib.sha256(data).hexdigest(), gz="unused")
    np.testing.assert_array_equal(read_idx(tmp_path / "l.gz", LABELS_MAGIC, good), np.arange(6))
    bad = checksums.FileSums(raw="0" * 64, gz="unused")
    with pytest.raises(DataError, match="checksum mismatch"):
        read_idx(tmp_path / "l.gz", LABELS_MAGIC, bad)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\0", "trailing bytes"),
        (lambda d: d[:6], "truncated inside its header"),
        (lambda d: (LABELS_MAGIC).to_bytes(4, "big") + d[4:], "magic number"),
        (lambda d: b"\x00\x00\x0d\x03" + d[4:], "magic number"),  # float type code
    ],
    ids=["short", "long", "header", "labels-magic", "float-type"],
)
def test_idx_refuses_bad_files(tmp_path: Path, mutate, message: str) -> None:
    data = mutate(idx_bytes(np.zeros((3, 2, 2), np.uint8), IMAGES_MAGIC))
    (tmp_path / "f").write_bytes(data)
    with pytest.raises(DataError, match=message):
        read_idx(tmp_path / "f", IMAGES_MAGIC)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(RNG.integers(0, 256, (50, 8, 8), dtype=np.uint8), IMAGES_MAGIC))
    (tmp_path / "f.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(tmp_path / "f.gz", IMAGES_MAGIC)


def test_idx_pair_half_present_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert find_idx_pair([tmp_path], "train") is None
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*missing"):
        find_idx_pair([tmp_path], "test")


# ------------------------------------------------------------------------------------- safe unpickler


class _Evil:
    """Unpickling this with plain pickle.load would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_safe_unpickler_loads_numpy_arrays(protocol: int) -> None:
    obj = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])), [np.zeros(0)], {b"k": b"v"})
    back = load_numpy_pickle(io.BytesIO(pickle.dumps(obj, protocol=protocol)), "mem")
    assert back[2] == {b"k": b"v"}
    np.testing.assert_array_equal(back[0][0], obj[0][0])
    assert back[0][1].dtype == np.int64


def test_safe_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps((np.zeros(3), _Evil(marker)))
    with pytest.raises(DataError, match="unsafe or corrupt pickle"):
        load_numpy_pickle(io.BytesIO(payload), "evil.pkl")
    assert not marker.exists()
    # The same payload disguised as the mnist bundle in the data directory is refused by load_dataset.
    (tmp_path / "mnist.pkl.gz").write_bytes(gzip.compress(payload))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("mnist", data_dir=tmp_path)
    assert not marker.exists()


def test_safe_unpickler_refuses_other_codecs() -> None:
    # A hand-written protocol-2 pickle: _codecs.encode("x", "rot13"); only latin-1 is admitted.
    payload = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(DataError, match="rot13"):
        load_numpy_pickle(io.BytesIO(payload), "codec.pkl")


def test_safe_unpickler_refuses_object_arrays() -> None:
    payload = pickle.dumps(np.array([1, "a"], dtype=object))
    with pytest.raises(DataError, match="object array"):
        load_numpy_pickle(io.BytesIO(payload), "obj.pkl")


# ------------------------------------------------------------------------------------------ CIFAR-10


def cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8)
    raw = np.concatenate([y[:, None], x.reshape(n, -1)], axis=1).tobytes()
    return raw, x, y.astype(np.int64)


def write_cifar_bin(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Five train batches of 3 and a test batch of 4 records; returns the expected arrays per split."""
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    parts: dict[str, list] = {"train": [], "test": []}
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        raw, x, y = cifar_records(4 if name == "test_batch.bin" else 3, seed=i)
        (d / name).write_bytes(raw)
        parts["test" if name == "test_batch.bin" else "train"].append((x, y))
    return {
        s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v])) for s, v in parts.items()
    }


@pytest.mark.parametrize("subdir", ["", "cifar10"])
def test_cifar_binary_batches(tmp_path: Path, subdir: str) -> None:
    expected = write_cifar_bin(tmp_path / subdir)
    for split in ("train", "test"):
        ds = load_dataset("cifar10", split, data_dir=tmp_path)
        x, y = expected[split]
        assert ds.x.shape == (len(y), 3, 32, 32) and ds.x.dtype.is_floating_point
        np.testing.assert_array_equal(ds.x.numpy(), x.astype(np.float32) / 255)  # CHW order kept
        np.testing.assert_array_equal(ds.y.numpy(), y)
        assert "binary release" in ds.source


def test_cifar_python_release(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    expected = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        _, x, y = cifar_records(2, seed=10 + i)
        batch = {b"data": x.reshape(2, -1), b"labels": [int(v) for v in y], b"batch_label": b"x"}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
        expected.append((x, y))
    ds = load_dataset("cifar10:cat,dog,airplane", "test", data_dir=tmp_path)
    x, y = expected[-1]
    keep = np.isin(y, [3, 5, 0])
    np.testing.assert_array_equal(ds.x.numpy(), x[keep].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y.numpy(), np.array([{3: 0, 5: 1, 0: 2}[v] for v in y[keep]]))


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CIFAR-10 not found: .*cifar10 .*cifar-10-binary\.tar\.gz"):
        load_dataset("cifar10", data_dir=tmp_path)
    write_cifar_bin(tmp_path)
    d = tmp_path / "cifar-10-batches-bin"
    (d / "test_batch.bin").write_bytes((d / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    (d / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="test_batch.bin missing"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    raw, _, _ = cifar_records(1, 0)
    (d / "test_batch.bin").write_bytes(bytes([10]) + raw[1:])
    with pytest.raises(DataError, match="outside 0..9"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = write_cifar_bin(tmp_path / "src")
    tar_path = tmp_path / "data" / "cifar10" / "cifar-10-binary.tar.gz"
    tar_path.parent.mkdir(parents=True)
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
        evil = tarfile.TarInfo("../../escape/data_batch_1.bin")  # not read, never written anywhere
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
        link = tarfile.TarInfo("cifar-10-batches-bin/readme.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10", data_dir=tmp_path / "data")
    monkeypatch.setattr(checksums, "CIFAR10_BINARY_TAR_SHA256", checksums.sha256_file(tar_path))
    for split in ("train", "test"):
        ds = load_dataset("cifar10", split, data_dir=tmp_path / "data")
        np.testing.assert_array_equal(ds.y.numpy(), expected[split][1])
        np.testing.assert_array_equal(ds.x.numpy(), expected[split][0].astype(np.float32) / 255)
        assert "tarball" in ds.source
    assert not (tmp_path / "escape").exists()


# ----------------------------------------------------------------------------------------- download


def test_download_verifies_and_is_atomic(tmp_path: Path) -> None:
    src = tmp_path / "remote.bin"
    src.write_bytes(b"official contents")
    url = src.as_uri()
    dest = tmp_path / "dl" / "file.bin"
    with pytest.raises(DataError, match="checksum mismatch for the download"):
        download(url, dest, "0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no temp file left behind
    download(url, dest, hashlib.sha256(b"official contents").hexdigest())
    assert dest.read_bytes() == b"official contents"
    with pytest.raises(DataError, match="could not download"):
        download((tmp_path / "absent").as_uri(), tmp_path / "x", "0" * 64)
