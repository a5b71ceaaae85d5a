"""Seeding: one call makes CPU runs bit-for-bit reproducible; :func:`check_seed` says which seeds are valid;
:func:`torch_threads` sets the CPU thread count for a block (CPU results depend on it: float sums are split
differently across threads); :func:`usable_threads` caps a requested count at the CPU cores this process
may use.

A seed is an integer in ``[0, 2**32 - 1]``: what numpy's legacy ``np.random.seed`` accepts (torch takes any
64-bit value, so this is the narrower of the two), and small enough that the seeds the project derives from
it (``seed * 100_003 + epoch`` for margin tracking, ``seed + 1_000_003 * rank`` under data parallelism) stay
far inside torch's 64-bit range.
"""

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from marginlab.base.errors import ConfigError

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1


def check_seed(seed: object, name: str = "seed") -> int:
    """Return ``seed`` if it is an int in ``[0, MAX_SEED]``, else raise a one-line :class:`ConfigError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{name} must be an integer in [0, {MAX_SEED}] (= 2**32 - 1), got {seed!r}")
    return seed


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a fresh CPU generator seeded with ``seed``."""
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows: no affinity mask
        return max(1, os.cpu_count() or 1)


def usable_threads(threads: int, what: str = "threads") -> int:
    """``threads`` capped at :func:`available_cores`, with a warning when capped.

    More threads than cores gain nothing, and far more (``--threads 100000``) make OpenMP fail to map
    its threads' stacks and crash the process; so the count is clamped rather than refused, which also
    lets one config (``train.threads``) run on machines of any size."""
    cores = available_cores()
    if threads > cores:
        log.warning("%s %d is more than the %d CPU cores here; using %d", what, threads, cores, cores)
        return cores
    return threads


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` CPU threads in torch inside the block (``None``: leave them; capped at the cores
    available, :func:`usable_threads`), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(usable_threads(threads, "train.threads"))
    try:
        yield
    finally:
        torch.set_num_threads(before)
