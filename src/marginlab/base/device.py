"""The one device choice: a config's device spec (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``) to a
:class:`torch.device`, with a one-line :class:`ConfigError` when the device does not exist here.

    resolve_device("auto")                         # CUDA if this machine has it, else the CPU
    resolve_device("cuda", local_rank=2)           # under torchrun: this process's GPU, cuda:2
    resolve_device("cuda", key="train.device")     # errors name the config key

A bare ``"cuda"`` (or ``"auto"`` on a CUDA machine) stays unindexed (``torch.device("cuda")``, i.e. the
current device) unless a ``local_rank`` is given; an explicit ``"cuda:N"`` is taken as written.
"""

from __future__ import annotations

import re

import torch

from marginlab.base.errors import ConfigError

DEVICE_SPECS = ("auto", "cpu", "cuda", "cuda:N")  # what a spec may be (N: a CUDA device index)
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(
    spec: str | torch.device, *, local_rank: int | None = None, key: str = "device"
) -> torch.device:
    """The device ``spec`` names on this machine.

    Args:
        spec: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or a
            :class:`torch.device` of those types.
        local_rank: under data parallelism, this process's GPU: a bare ``"cuda"``/``"auto"`` becomes
            ``cuda:local_rank`` (ignored for the CPU and for an explicit ``"cuda:N"``).
        key: the config key the spec came from, named in errors.

    Raises:
        ConfigError: (one line) ``spec`` is no device spec, or names a CUDA device this machine lacks.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        choices = ", ".join(f'"{s}"' for s in DEVICE_SPECS)
        raise ConfigError(f"{key} = {str(spec)!r} is not a device; use one of {choices}")
    if not torch.cuda.is_available():
        raise ConfigError(f'{key} = "{spec}" but no CUDA device is available; use "auto" or "cpu"')
    if match.group(1) is not None:
        index, count = int(match.group(1)), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f'{key} = "{spec}" but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})'
            )
        return torch.device("cuda", index)
    return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
