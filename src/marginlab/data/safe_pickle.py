"""A restricted unpickler for pickles that hold only numpy arrays (and tuples/lists of them).

Plain :func:`pickle.load` runs whatever callable a pickle names, so a tampered file can execute code.
Here :meth:`pickle.Unpickler.find_class` -- the only way a pickle can reach a callable, including via
``REDUCE``, ``INST``, ``OBJ`` and the copyreg extension codes -- admits exactly numpy's array
reconstruction helpers, plus checked stand-ins for ``_codecs.encode`` (latin-1 only) and ``bytes``
(bytes only) through which protocol-2 pickles written by Python 3 store byte strings; nothing else.
Object arrays are refused too, because their elements could smuggle in further objects.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from types import ModuleType
from typing import NoReturn, Protocol

import numpy as np

from marginlab.base.errors import DataError


def _numpy_core(name: str) -> ModuleType:
    """numpy's private module ``name``: ``numpy._core.<name>`` (numpy >= 2), else ``numpy.core.<name>``."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # numpy 1.26
        return importlib.import_module(f"numpy.core.{name}")


_multiarray = _numpy_core("multiarray")
_numeric = _numpy_core("numeric")


class ReadableBinary(Protocol):
    """What :func:`load_numpy_pickle` reads from: an open binary file (plain, gzip, a tar member...)."""

    def read(self, n: int, /) -> bytes:
        """Up to ``n`` bytes."""
        ...

    def readline(self) -> bytes:
        """Bytes up to and including the next newline."""
        ...


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call to rebuild ``bytes``; latin-1 only."""
    if encoding.lower().replace("-", "") != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _bytes(data: bytes = b"") -> bytes:
    """``bytes(x)`` as protocol-2 pickles use it, for bytes input only (``bytes(10**12)`` would not be)."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("refusing bytes() of anything but bytes")
    return data


# (module, name) as written in the pickle -> the object it may resolve to. Pickles written by numpy < 2
# name ``numpy.core.multiarray``; numpy >= 2 writes ``numpy._core.multiarray``.
ALLOWED: dict[tuple[str, str], Callable[..., object]] = {
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,  # protocol >= 5 contiguous arrays
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Callable[..., object]:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None

    def persistent_load(self, pid: object) -> NoReturn:
        raise pickle.UnpicklingError("refusing a persistent id")


def load_numpy_pickle(f: ReadableBinary, where: str) -> object:
    """Unpickle ``f`` admitting numpy arrays only; ``where`` names the file in error messages.

    ``encoding="latin1"`` lets Python 3 read Python 2 pickles of arrays (their raw bytes are ``str``).

    Raises:
        DataError: the pickle names anything but numpy's array classes, holds an object array, nests
            containers over :data:`MAX_DEPTH` levels, or is corrupt.
    """
    try:
        obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{where}: unsafe or corrupt pickle ({e}); only numpy arrays are allowed") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{where}: corrupt pickle ({type(e).__name__}: {e})") from None
    except (RecursionError, MemoryError) as e:  # e.g. numpy rebuilding a crafted array
        raise DataError(f"{where}: unreadable pickle ({type(e).__name__}); replace it") from None
    _refuse_object_arrays(obj, where)
    return obj


# Deeper than any real data file nests its arrays (mnist.pkl.gz: 3 levels); the unpickler builds any depth
# without recursion, but checking or using such an object recursively would raise RecursionError.
MAX_DEPTH = 100


def _refuse_object_arrays(obj: object, where: str) -> None:
    """Refuse object arrays anywhere in ``obj`` and containers nested over :data:`MAX_DEPTH` levels;
    iterative (an explicit stack), so a pickle nested 300,000 levels deep is one line, not a crash."""
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise DataError(f"{where}: refusing an object array in a pickle; only numeric arrays are allowed")
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, tuple | list):
            if depth >= MAX_DEPTH:
                raise DataError(
                    f"{where}: containers nested over {MAX_DEPTH} levels deep; not a data file (corrupt "
                    "or crafted), replace it"
                )
            stack.extend((child, depth + 1) for child in item)
