"""Dataset specs (``"mnist:0,1"``), class subsets, ±1 labels and seeded subsampling.

A spec is a dataset name, optionally followed by ``:`` and a comma-separated list of classes, each
given by name (case-insensitive) or by index. The i-th listed class becomes label ``i``; with
``labels="pm1"`` a two-class task gets -1 for the first listed class and +1 for the second.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from marginlab.base.errors import ConfigError, DataError

LABEL_MODES = ("index", "pm1")


def parse_spec(spec: str) -> tuple[str, list[str] | None]:
    """Split ``"name:a,b"`` into ``("name", ["a", "b"])``; no colon gives ``(name, None)``."""
    name, colon, rest = spec.partition(":")
    name = name.strip().lower()
    if not name:
        raise DataError(f"empty dataset name in spec {spec!r}; write e.g. 'mnist' or 'mnist:0,1'")
    if not colon:
        return name, None
    tokens = [t.strip() for t in rest.split(",")]
    if not all(tokens):
        raise DataError(f"empty class name in spec {spec!r}; list classes like 'mnist:0,1'")
    return name, tokens


def resolve_classes(dataset: str, all_classes: tuple[str, ...], tokens: list[str]) -> tuple[int, ...]:
    """Indices of the listed classes (names win over indices: a class called "3" is class "3")."""
    lower = [c.lower() for c in all_classes]
    picked: list[int] = []
    for token in tokens:
        if token.lower() in lower:
            index = lower.index(token.lower())
        elif token.isdigit() and int(token) < len(all_classes):
            index = int(token)
        else:
            raise DataError(
                f"unknown class {token!r} for {dataset}; use a name or index 0..{len(all_classes) - 1}: "
                f"{', '.join(all_classes)}"
            )
        if index in picked:
            raise DataError(f"class {all_classes[index]!r} is listed twice in the {dataset} spec")
        picked.append(index)
    return tuple(picked)


def select_classes(y: np.ndarray, picked: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is in ``picked`` (in original order) and their labels remapped to ``0..k-1``."""
    remap = np.full(max(int(y.max(initial=0)), *picked) + 1, -1, dtype=np.int64)
    remap[list(picked)] = np.arange(len(picked))
    rows = np.flatnonzero(remap[y] >= 0)
    return rows, remap[y[rows]]


def subsample(count: int, n: int | None, seed: int, what: str) -> np.ndarray | None:
    """``n`` of ``count`` row indices chosen with ``torch.Generator`` seeded by ``seed``, sorted.

    Sorting keeps the rows in their original order, so the result depends only on the chosen set.
    ``None`` (no subsampling) is returned when ``n`` is ``None``.
    """
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise DataError(f"n must be a positive integer (or None for all), got {n!r}")
    n = int(n)
    if n > count:
        raise DataError(f"asked for n={n} points but {what} has only {count}; lower n")
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(count, generator=generator)[:n]
    return torch.sort(chosen).values.numpy()


def apply_label_mode(y: np.ndarray, labels: str, num_classes: int, spec: str) -> np.ndarray:
    """Labels as ``0..k-1`` (``"index"``) or as -1/+1 for two classes (``"pm1"``)."""
    if labels not in LABEL_MODES:
        raise ConfigError(f"unknown labels mode {labels!r}; choose from: {', '.join(LABEL_MODES)}")
    if labels == "index":
        return y
    if num_classes != 2:
        raise DataError(
            f"labels='pm1' needs exactly two classes, but {spec!r} has {num_classes}; write e.g. 'mnist:0,1'"
        )
    return 2 * y - 1
