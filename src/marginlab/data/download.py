"""Opt-in downloads of official dataset files, verified by SHA-256 before they are kept.

Only the standard library (``urllib``) is used. A download streams into a temporary file next to the
target (through :func:`marginlab.base.fsio.atomic_write_with`) while it is hashed; the file is renamed into
place only when the checksum matches, so a failed or corrupt download never leaves a file behind.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from marginlab.base.errors import DataError
from marginlab.base.fsio import atomic_write_with

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class _ChecksumMismatch(Exception):
    """Raised inside the writer so that the temporary file is discarded."""


def download(url: str, dest: Path, sha256: str, *, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` if its SHA-256 equals ``sha256``; return ``dest``.

    Raises:
        DataError: the server cannot be reached or answers with an error, or the checksum differs.
    """
    log.info("downloading %s -> %s", url, dest)

    def write(f: IO[bytes]) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(_CHUNK):
                digest.update(block)
                f.write(block)
        if digest.hexdigest() != sha256:
            raise _ChecksumMismatch(digest.hexdigest())

    try:
        atomic_write_with(dest, write)
    except _ChecksumMismatch as e:
        raise DataError(
            f"checksum mismatch for the download {url}: SHA-256 {str(e)[:16]}... but the official file "
            f"has {sha256[:16]}...; nothing was saved (try again later or another mirror)"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download {url}: {reason}") from None
    return dest


def download_first(urls: Sequence[str], dest: Path, sha256: str) -> Path:
    """Try each mirror in turn; raise the last mirror's :class:`DataError` if none works."""
    error: DataError | None = None
    for url in urls:
        try:
            return download(url, dest, sha256)
        except DataError as e:
            log.warning("%s", e)
            error = e
    assert error is not None, "no mirrors given"
    raise error
