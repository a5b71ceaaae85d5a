#!/usr/bin/env python3
"""Compare two run directories (or two trees of them) value by value, timings aside.

    python scripts/diff_runs.py results-before/ results-after/

Used to show that a change of code leaves results bit-identical: the same files, and in them the same
values, exactly (floats compared bit for bit, tensors with ``torch.equal``, arrays with
``np.array_equal``). What legitimately differs between two runs of the same seed is ignored: timings
(keys named ``seconds``, ``time``, ``elapsed``... or ending in ``_s``), ``provenance.json`` (host,
versions, command, dates) and the ``.lock`` files. Figures (PNG) are compared byte for byte.

Prints one line per difference and exits 1 if there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

SKIP_FILES = {"provenance.json", ".lock"}
TIMING = re.compile(r"(^|[._])(s|sec|secs|seconds|time|times|elapsed|wall|duration|timings?)$|_s$|^time\.")


def _is_timing(key: object) -> bool:
    return isinstance(key, str) and bool(TIMING.search(key))


def _same(a: Any, b: Any, where: str, out: list[str]) -> None:
    """Append a line to ``out`` for every value that differs between ``a`` and ``b`` (recursively)."""
    if isinstance(a, dict) and isinstance(b, dict):
        ka = [k for k in a if not _is_timing(k)]
        kb = [k for k in b if not _is_timing(k)]
        if ka != kb:
            out.append(f"{where}: keys differ: {sorted(set(ka) ^ set(kb)) or 'order'}")
        for k in ka:
            if k in b:
                _same(a[k], b[k], f"{where}.{k}", out)
        return
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            out.append(f"{where}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _same(x, y, f"{where}[{i}]", out)
        return
    try:
        import torch

        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            ok = (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(a, b)
            )
            if not ok:
                out.append(f"{where}: tensors differ")
            return
    except ImportError:
        pass
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        xa, xb = np.asarray(a), np.asarray(b)
        nan_ok = xa.dtype.kind in "fc"  # equal_nan only for float and complex arrays
        if not (xa.dtype == xb.dtype and np.array_equal(xa, xb, equal_nan=nan_ok)):
            out.append(f"{where}: arrays differ")
        return
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    if type(a) is not type(b) or a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def _jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _load(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if suffix == ".pt":
        import torch

        return torch.load(path, map_location="cpu", weights_only=False)
    if suffix in (".csv", ".md", ".txt", ".html", ".toml"):
        return path.read_text().splitlines()
    return path.read_bytes()


def diff_trees(before: Path, after: Path) -> list[str]:
    """Every difference between the files under ``before`` and ``after`` (relative paths matched)."""
    files_a = {p.relative_to(before) for p in before.rglob("*") if p.is_file() and p.name not in SKIP_FILES}
    files_b = {p.relative_to(after) for p in after.rglob("*") if p.is_file() and p.name not in SKIP_FILES}
    out = [f"only in {before}: {p}" for p in sorted(files_a - files_b)]
    out += [f"only in {after}: {p}" for p in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        a, b = _load(before / rel), _load(after / rel)
        if isinstance(a, bytes):
            if a != b:
                out.append(f"{rel}: bytes differ")
            continue
        _same(a, b, str(rel), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    for d in (args.before, args.after):
        if not d.is_dir():
            print(f"diff_runs.py: error: {d} is not a directory", file=sys.stderr)
            return 2
    diffs = diff_trees(args.before, args.after)
    for line in diffs:
        print(line)
    n = sum(1 for p in args.before.rglob("*") if p.is_file())
    print(f"{len(diffs)} difference(s) over {n} files (timings and provenance aside)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
