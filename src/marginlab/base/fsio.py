"""Atomic file output and JSON/JSONL helpers.

Every result file goes through here so that a crash or a kill never leaves a half-written file: data are
written to a temporary file in the same directory, flushed to disk, then renamed over the target
(``os.replace`` is atomic on POSIX). JSONL metrics are appended one fsync'd line at a time; a reader
ignores a torn last line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import hashlib
import json
import math
import os
import secrets
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from marginlab.base.errors import RunDirError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TMP_SUFFIX = ".tmp"  # temporary files of atomic writes are ``.<name>.<random>.tmp`` beside the target
# Errors of the disk rather than of the program: reported as one line naming the file.
_DISK_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.EIO,
}


@contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO[Any]]:
    """Yield a temporary file next to ``path``; on success it replaces ``path`` atomically.

    A full disk, a read-only filesystem or a missing permission raise :class:`RunDirError` naming
    ``path``; the previous version of ``path`` is left untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(path, e) from None
    # The temporary name is chosen before the file exists (not by mkstemp), so that an exception at any
    # moment after its creation, a Ctrl-C (KeyboardInterrupt) or SIGTERM included, removes it: mkstemp
    # returns the name only after creating the file, and an interrupt in between left it behind.
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.fchmod(fd, 0o644)  # results are meant to be shared, whatever the umask
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if not isinstance(e, FileExistsError):  # (that one: another writer's file, by a 2^-32 chance)
            with contextlib.suppress(OSError):  # e.g. a name too long: there is no file to remove
                tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and is_disk_error(e):
            raise disk_error(path, e) from None
        interrupt = None if isinstance(e, KeyboardInterrupt) else _interrupt_behind(e)
        if interrupt is not None:  # a library's clean-up failed on the way out of a Ctrl-C / SIGTERM
            raise interrupt from None
        raise
    _fsync_dir(path.parent)


def _interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The interrupt that ``e`` was raised while handling, if any (``e`` itself excluded). A signal that
    lands inside a writer's clean-up code (``np.savez``'s zip file, say) comes out as that code's own
    error, e.g. ``ValueError: Can't close the ZIP file``; the interrupt is what really happened."""
    seen: set[int] = set()
    ctx = e.__context__
    while ctx is not None and id(ctx) not in seen:
        if isinstance(ctx, KeyboardInterrupt):
            return ctx
        seen.add(id(ctx))
        ctx = ctx.__context__
    return None


def _temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<random>.tmp`` (:data:`TMP_SUFFIX`)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        if not os.path.lexists(tmp):
            return tmp


def is_disk_error(e: BaseException) -> bool:
    """Whether ``e`` says the disk refused a write (full, read-only, no permission, name too long)."""
    return isinstance(e, OSError) and e.errno in _DISK_ERRNOS


def disk_error(path: Path, e: BaseException) -> RunDirError:
    """The one-line error for a write to ``path`` that the disk refused."""
    reason = os.strerror(e.errno).lower() if isinstance(e, OSError) and e.errno else str(e)
    return RunDirError(f"cannot write {path}: {reason}")


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; some filesystems refuse O_RDONLY fsync on dirs, which is harmless.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it)."""
    with _atomic_file(Path(path), "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, in the locale's encoding like :func:`open`."""
    with _atomic_file(Path(path), "w") as f:
        f.write(text)


def atomic_write_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Call ``writer(fileobj)`` on a binary temp file, then rename it to ``path``."""
    with _atomic_file(Path(path), "wb") as f:
        writer(f)


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """``torch.save`` atomically. The object is serialised in memory first: torch's zip writer turns a
    full disk into an opaque ``RuntimeError``, a plain file write gives the ``OSError`` it really is."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def atomic_savefig(fig: Figure, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically; the format is taken from the suffix of ``path``."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    kwargs.setdefault("dpi", 120)
    kwargs.setdefault("bbox_inches", "tight")
    atomic_write_with(path, lambda f: fig.savefig(f, format=fmt, **kwargs))
    return path


def to_jsonable(obj: object) -> Any:
    """Convert tensors, numpy values, dataclasses, enums and paths to plain JSON values.

    Non-finite floats become ``None`` (JSON has no NaN/inf); a reader treats ``None`` as missing.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor without importing torch
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def dumps(obj: object, indent: int | None = 2) -> str:
    """``obj`` as JSON text (after :func:`to_jsonable`); ``indent=None`` gives one line."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON plus a final newline to ``path``, atomically."""
    atomic_write_text(path, dumps(obj) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path`` (untyped: callers check its shape). JSON nested too deeply for the
    parser's recursion is ``ValueError``, like any other invalid JSON (marginlab writes none so deep)."""
    with open(path) as f:
        try:
            return json.load(f)
        except RecursionError:
            raise ValueError(f"{path} is nested too deeply") from None


def append_jsonl(path: str | Path, record: object) -> None:
    """Append one JSON record as a line and fsync it (a kill can at most tear this one line)."""
    line = dumps(record, indent=None) + "\n"
    try:
        with open(path, "a") as f:
            start = f.tell()
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                f.truncate(start)  # never leave a torn line in the middle of the file
                raise
    except OSError as e:
        if is_disk_error(e):
            raise disk_error(Path(path), e) from None
        raise


def read_jsonl(path: str | Path) -> list[Any]:
    """Read a JSONL file, ignoring a torn (unparsable) final line left by a crash.

    An unparsable line anywhere else is damage, not a kill: ``ValueError`` naming the file and line."""
    records: list[Any] = []
    path = Path(path)
    if not path.exists():
        return records
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path} line {i + 1} is nested too deeply") from None
    return records


def write_jsonl(path: str | Path, records: Sequence[object]) -> None:
    """Rewrite a whole JSONL file atomically (used when resuming from a checkpoint)."""
    atomic_write_text(path, "".join(dumps(r, indent=None) + "\n" for r in records))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks): which code or weights a result came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file of a run directory; a damaged file raises :class:`RunDirError`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, KeyError, zlib.error) as e:
        raise RunDirError(f"{path} is corrupt ({type(e).__name__}); delete it or rerun") from None
    except Exception as e:  # zipfile raises BadZipFile and friends for a damaged archive
        if type(e).__module__ == "zipfile":
            raise RunDirError(f"{path} is corrupt ({type(e).__name__}); delete it or rerun") from None
        raise
    # marginlab writes real numbers, integers, flags and short labels only: complex numbers, bytes or
    # anything else are damage (and would fail far from here, e.g. in a histogram)
    odd = next((k for k, a in arrays.items() if a.dtype.kind not in "fiubU"), None)
    if odd is not None:
        raise RunDirError(f"{path} is corrupt (array {odd!r} is {arrays[odd].dtype}); delete it or rerun")
    return arrays
