"""Data-parallel plumbing over ``torch.distributed``: one small context object the training loop uses.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...), or
as several tasks of a SLURM job (:func:`slurm_torch_env` turns ``SLURM_PROCID``... into the same
variables), a run joins a process group (gloo on CPU, NCCL on GPU). Without those variables everything
degrades to a single process with no-op collectives, so the training loop has exactly one code path.

Sharding rule (used for training batches and for margin tracking alike): a sequence of ``n`` items is
cut into ``world_size`` contiguous chunks with ``torch.tensor_split`` semantics, rank ``r`` taking chunk
``r``. Every rank draws the same global permutation from the same seeded generator, so the union of the
shards of a global batch is exactly the single-process batch.
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from marginlab.base.errors import ConfigError

_PORT_BASE, _PORT_SPAN = 20000, 20000  # MASTER_PORT of a SLURM job: 20000 + job id mod 20000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``, ``"n1,n2"`` -> ``"n1"``.

    SLURM's compressed form is ``PREFIX[a-b,c]SUFFIX`` groups separated by commas; the first host is the
    first group's prefix with the first number of its bracket (zero padding kept)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if match is None:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return f"{prefix}{first}{suffix or ''}"


def slurm_torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) for
    one process of a SLURM job step started with several tasks (``srun``: ``SLURM_PROCID``,
    ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``); empty for a single
    task or outside SLURM. Variables already set (a ``torchrun`` inside the job) are kept: only the
    missing ones are returned, so ``os.environ.update(...)`` never overrides a launcher's choice."""
    ntasks = int(environ.get("SLURM_NTASKS", "1") or "1")
    if ntasks <= 1 or "RANK" in environ:
        return {}
    job = int(environ.get("SLURM_JOB_ID", "0") or "0")
    env = {
        "RANK": environ.get("SLURM_PROCID", "0"),
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": first_host(environ.get("SLURM_JOB_NODELIST", "localhost")),
        # one port per job: two jobs sharing a node must not meet at the same rendezvous
        "MASTER_PORT": str(_PORT_BASE + job % _PORT_SPAN),
    }
    return {k: v for k, v in env.items() if k not in environ}


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes the launcher started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (or in a plain single-process run): the only process that writes files."""
    return env_rank() == 0


@dataclass
class DistContext:
    """Who this process is in a data-parallel group; collectives are no-ops when ``world_size == 1``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when there is more than one process (the collectives then communicate)."""
        return self.world_size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's contiguous chunk of ``n`` items (``tensor_split`` sizes)."""
        return shard_bounds(n, self.world_size, self.rank)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks (in place, returned for convenience)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_shards(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every rank's chunk of an ``n``-item array (``t`` = this rank's chunk ``[n_r, ...]``).

        Chunks may differ in length by one; they are padded to equal size for ``all_gather`` and trimmed.
        Returns the full ``[n, ...]`` tensor on every rank.
        """
        if not self.enabled:
            return t
        sizes = [shard_bounds(n, self.world_size, r) for r in range(self.world_size)]
        width = max(stop - start for start, stop in sizes)
        pad = t.new_zeros((width, *t.shape[1:]))
        pad[: t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        dist.all_gather(parts, pad)
        return torch.cat([p[: stop - start] for p, (start, stop) in zip(parts, sizes, strict=True)])

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's ``obj`` (a picklable value) on every rank, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every rank has reached this point (a no-op in a single process)."""
        if self.enabled:
            dist.barrier()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of chunk ``rank`` when ``n`` items are cut into ``world_size`` near-equal chunks."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def init_distributed(device_type: str) -> DistContext:
    """Join the process group described by the environment, or return a single-process context.

    ``device_type`` ("cpu" or "cuda") picks the backend: NCCL for CUDA, gloo for CPU.
    """
    world = env_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    # The group stays up for later runs in this process (the regularizer comparison trains several
    # models one after another) and is left at exit.
    atexit.register(_destroy)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank)
