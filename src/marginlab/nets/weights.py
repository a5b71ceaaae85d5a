"""Read a weights file into a model, whatever the checkpoint layout and key names (no pickled code runs).

Published checkpoints differ from a plain ``model.state_dict()`` in three ways, all handled here:
the state_dict sits inside a dict (``{"model_state_dict": ..., "epoch": 90}``), a DataParallel / DDP
wrapper prefixed every key with ``module.``, or the layers have other names (``fc3.weight`` for our
``head.weight``). The last is resolved by explicit prefix renames (``key_map``) and by pairing the
tensors without a matching name in order with the model's when every shape matches (the mapping is
logged and returned so that results can record it).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import torch
from torch import nn

from marginlab.base.errors import ConfigError

log = logging.getLogger(__name__)

# where checkpoints keep the state_dict, most specific first (searched one or two levels deep)
CHECKPOINT_KEYS = ("model_state_dict", "state_dict", "model", "net", "network", "module", "weights", "params")
# DataParallel / DistributedDataParallel and torch.compile wrap a model and prefix every key
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_weights` did: where the state_dict sat in the file (``found_under``, e.g.
    ``"model_state_dict"``; ``None`` at the top), the wrapper prefix it stripped, the ``--key-map``
    renames it applied and, when the names differed, the ``mapping`` checkpoint key -> model key."""

    path: str
    found_under: str | None = None
    stripped_prefix: str | None = None
    key_map: dict[str, str] = field(default_factory=dict)
    mapping: dict[str, str] | None = None


def _is_state_dict(obj: object) -> TypeGuard[dict[str, torch.Tensor]]:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _state_dict_from(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """``(state_dict, where)``: a plain state_dict, or one held in a checkpoint dict under a usual key
    (:data:`CHECKPOINT_KEYS`), one or two levels deep (``where`` = ``"ckpt/state_dict"``)."""
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        levels = [[(str(k), v) for k, v in obj.items()]]
        levels.append(
            [(f"{k}/{k2}", v2) for k, v in levels[0] if isinstance(v, dict) for k2, v2 in v.items()]
        )
        for level in levels:
            found = {k: v for k, v in level if _is_state_dict(v)}
            for key in CHECKPOINT_KEYS:  # the usual names first, in this order
                hit = next((k for k in found if k.rsplit("/", 1)[-1] == key), None)
                if hit is not None:
                    return found[hit], hit
            if len(found) == 1:  # one dict of tensors under an unusual name is unambiguous
                return next(iter(found.values())), next(iter(found))
            if found:
                raise ConfigError(
                    f"weights file {path} holds several state_dicts ({', '.join(found)}); "
                    "re-save the one to evaluate with torch.save(state_dict, path)"
                )
    raise ConfigError(f"weights file {path} does not hold a PyTorch state_dict (a dict of tensors)")


def _read_tensors(path: Path) -> object:
    """``torch.load(path, weights_only=True)``: tensors, containers and numpy scalars only, never code."""
    import numpy as np

    # numpy scalars and dtypes are plain data (checkpoints often store e.g. the best accuracy as one)
    numeric = [getattr(np.dtypes, f"{t}DType") for t in ("Bool", "Float16", "Float32", "Float64")]
    numeric += [getattr(np.dtypes, f"{u}Int{b}DType") for u in ("", "U") for b in (8, 16, 32, 64)]
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # numpy 2 / 1.26
    safe = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *numeric]
    try:
        # torch warns about pickle protocols it did not write; the error below says what matters
        with torch.serialization.safe_globals(safe), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except RecursionError:  # a pickle nested thousands of levels deep: no checkpoint looks like that
        raise ConfigError(
            f"cannot read weights file {path}: its contents are nested too deeply to be a state_dict"
        ) from None
    except Exception as e:  # torch raises many types for bad files (pickle, zip, EOF, runtime)
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise ConfigError(
                f"weights file {path} holds pickled Python objects ({unsafe.group(1)}), which marginlab "
                "never unpickles (that would run code from the file); re-save it as a state_dict"
            ) from None
        raise ConfigError(f"cannot read weights file {path}: {_load_error(e)}") from None


def _load_error(e: Exception) -> str:
    """The one line that says why ``torch.load(weights_only=True)`` failed. torch's own message for a
    file its safe unpickler cannot read is several lines, and advises retrying with ``weights_only=False``
    (which would run any code in the file): only its reason (``Unsupported operand 149``) is kept."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1]
        reason = next((line.strip() for line in after.splitlines() if line.strip()), "")
        return f"not a torch.save file of tensors (the safe unpickler stopped at: {reason or 'unknown'})"
    if "weights_only" in text:  # any other form of the same advice: keep none of it
        return "not a torch.save file of tensors"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


def _strip_wrapper(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Drop a DataParallel/DDP ``module.`` (or torch.compile ``_orig_mod.``) prefix shared by every key."""
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}, prefix
    return state, None


def apply_key_map(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by prefix: ``{"fc3.": "head."}`` turns ``fc3.weight`` into ``head.weight``. The
    longest matching prefix wins; an unused prefix is an error (it is almost certainly a typo)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in state.items():
        old = max((o for o in key_map if key.startswith(o)), key=len, default=None)
        if old is not None:
            used.add(old)
            key = key_map[old] + key[len(old) :]
        if key in out:
            raise ConfigError(f"--key-map maps two checkpoint keys to {key!r}")
        out[key] = value
    unused = [o for o in key_map if o not in used]
    if unused:
        raise ConfigError(f"--key-map prefix {unused[0]!r} matches no checkpoint key")
    return out


def parse_key_map(text: str | None) -> dict[str, str]:
    """``"fc3.=head.,features.=phi."`` -> ``{"fc3.": "head.", "features.": "phi."}`` (prefix renames)."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in str(text or "").split(",")):
        if not item:
            continue
        old, sep, new = (s.strip() for s in item.partition("="))
        if not sep:
            raise ConfigError(f"--key-map entries are OLD=NEW prefix renames, got {item!r}")
        out[old] = new
    return out


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def match_keys(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str) -> dict[str, str]:
    """Checkpoint key -> model key. Keys with the model's names match by name (equal shapes needed); the
    others (foreign names) pair up in order with the model keys left over, which needs as many of them
    and equal shapes pair by pair. ``where`` starts every error message (one line, the first mismatch)."""
    rest = [k for k in state if k not in own]
    left = [k for k in own if k not in state]
    if left and not rest:
        raise ConfigError(f"{where}: missing key {left[0]!r}")
    if rest and not left:
        raise ConfigError(f"{where}: unexpected key {rest[0]!r}")
    for key in (k for k in state if k in own):
        if state[key].shape != own[key].shape:
            raise ConfigError(
                f"{where}: {key!r} has shape {tuple(state[key].shape)}, expected {tuple(own[key].shape)}"
            )
    for ck, mk in zip(rest, left, strict=False):
        if state[ck].shape != own[mk].shape:
            raise ConfigError(
                f"{where}: checkpoint key {ck!r} {_shape(state[ck])} does not match model key {mk!r} "
                f"{_shape(own[mk])} (tensors are paired in order; rename with --key-map old=new)"
            )
    if len(rest) != len(left):
        side, first = ("checkpoint", rest[len(left)]) if len(rest) > len(left) else ("model", left[len(rest)])
        raise ConfigError(
            f"{where}: {len(rest)} checkpoint tensors to pair in order with {len(left)} model tensors "
            f"(first unpaired: {side} key {first!r})"
        )
    return {k: k for k in state if k in own} | dict(zip(rest, left, strict=True))


def _some(keys: dict[str, torch.Tensor], n: int = 3) -> str:
    """The first ``n`` keys, comma-separated, for an error line."""
    names = list(keys)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_dtypes(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], pairs: dict[str, str], where: str
) -> None:
    """Refuse a checkpoint tensor whose values a load would change: complex values where the model holds
    real ones (``load_state_dict`` drops the imaginary part with a mere warning), and integers or
    booleans where it holds floats (not trained weights). Float widths may differ (float16 -> float32
    is exact), and so may integer buffers (``num_batches_tracked``). ``where`` starts the message."""
    for ck, mk in pairs.items():
        got, want = state[ck].dtype, own[mk].dtype
        lossy = got.is_complex and not want.is_complex
        lossy |= want.is_floating_point and not (got.is_floating_point or got.is_complex)
        if lossy:
            name = ck if ck == mk else f"{ck} (for {mk})"
            raise ConfigError(
                f"{where}: tensor {name!r} is {str(got).removeprefix('torch.')}, the model's is "
                f"{str(want).removeprefix('torch.')}; re-save the weights as real floats"
            )


def load_weights(
    model: nn.Module, path: str | Path, *, key_map: dict[str, str] | None = None
) -> LoadedWeights:
    """Load the state_dict in ``path`` into ``model`` (in place) and say how it was matched.

    Accepts a plain state_dict or a checkpoint holding one (:data:`CHECKPOINT_KEYS`, one or two levels),
    strips DataParallel/DDP ``module.`` prefixes, applies ``key_map`` prefix renames, and maps foreign key
    names by pairing them in order with the model keys no checkpoint key names (equal shapes needed; the
    mapping is logged at INFO and returned). Keys that ``key_map`` renames must then name model keys
    (a rename is never paired in order), and tensors must hold what the model's hold (real floats for
    floats: :func:`check_dtypes`).
    Files are read with ``weights_only=True``: no pickled code ever runs. Anything that does not fit
    raises :class:`ConfigError` naming the first mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found")
    state, found_under = _state_dict_from(_read_tensors(path), path)
    state, stripped = _strip_wrapper(state)
    before = list(state)
    state = apply_key_map(state, key_map or {})
    own = model.state_dict()
    # a key the user renamed must land on a model key: pairing it in order instead would hide a typo
    renamed_by_map = [new for old, new in zip(before, state, strict=True) if old != new]
    stray = next((k for k in renamed_by_map if k not in own), None)
    if stray is not None:
        raise ConfigError(
            f"--key-map renames a checkpoint key of {path} to {stray!r}, which is not a key of this "
            f"{type(model).__name__} (its keys: {_some(own)})"
        )
    pairs = match_keys(state, own, f"weights file {path} does not fit this {type(model).__name__}")
    check_dtypes(state, own, pairs, f"weights file {path}")
    renamed = {c: m for c, m in pairs.items() if c != m}
    if renamed:
        log.info("weights %s: checkpoint keys mapped to model keys in order: %s", path,
                 ", ".join(f"{c} -> {m}" for c, m in renamed.items()))  # fmt: skip
    model.load_state_dict({pairs[k]: v for k, v in state.items()})
    return LoadedWeights(str(path), found_under, stripped, dict(key_map or {}), renamed or None)
