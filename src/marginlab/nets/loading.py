"""Turn a model spec and a weights file into an eval-mode ``nn.Module``, and record what was loaded.

:func:`load_model` is the one entry point: the spec is classified (:mod:`marginlab.nets.spec`); a registry
name or Python factory is built (:mod:`marginlab.nets.usercode`), a TorchScript archive or an ONNX file
(onnx2torch, the optional extra ``marginlab[onnx]``) loaded (:func:`load_saved`); weights (a state_dict or
a checkpoint, see :mod:`marginlab.nets.weights`) are loaded into it; ``preprocess`` folds input
normalisation into the model as a first layer (:mod:`marginlab.nets.preprocess`), so that attacks, bounds
and ε all live in [0, 1] pixel space; one forward pass checks that it gives ``[N, num_classes]`` logits.
The :class:`LoadedModel` it returns carries a JSON-able record of all of it (spec, kind, options,
SHA-256 of the code or archive and of the weights, how the weights were matched, preprocessing).

marginlab 0.1 had all of this in ``marginlab.model_io``; that name now imports this module, and its other
names (``parse_preprocess``, ``check_spec`` ...) are deprecated aliases of their new homes here.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marginlab.base.deprecated import moved_attribute
from marginlab.base.errors import ConfigError
from marginlab.base.fsio import file_sha256
from marginlab.nets.preprocess import Normalize, Preprocess
from marginlab.nets.spec import ModelSpec, resolve_spec
from marginlab.nets.usercode import build_from_spec, first_line
from marginlab.nets.weights import load_weights

log = logging.getLogger(__name__)
ONNX_HINT = (
    "pip install 'marginlab[onnx]' (onnx2torch; it imports torchvision, which needs a torchvision build "
    "matching this torch: the CPU torch wheel has none on PyPI)"
)


@dataclass(frozen=True)
class LoadedModel:
    """An eval-mode model and the JSON-able record of how it was loaded (see :func:`load_model`)."""

    model: nn.Module
    record: dict[str, Any]


def load_saved(spec: ModelSpec) -> nn.Module:
    """A TorchScript archive (``torch.jit.load``) or an ONNX file (onnx2torch) as an ``nn.Module``."""
    path = Path(spec.source)
    if spec.kind == "torchscript":
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream; the user chose the file
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ConfigError(f"cannot load TorchScript model {path}: {first_line(e)}") from None
    try:
        from onnx2torch import convert
    except Exception as e:  # not installed, or its torchvision import fails beside this torch
        raise ConfigError(
            f"ONNX models need the optional extra: {ONNX_HINT}; here: {first_line(e)}"
        ) from None
    try:
        return convert(str(path))
    except Exception as e:
        raise ConfigError(f"cannot convert ONNX model {path}: {first_line(e)}") from None


def check_forward(model: nn.Module, input_shape: Sequence[int], num_classes: int, what: str) -> None:
    """One forward pass on zeros ``[2, C, H, W]`` must give logits ``[2, num_classes]`` (else one line)."""
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
    except Exception as e:
        shape = ", ".join(str(s) for s in input_shape)
        raise ConfigError(f"{what} fails on the data's inputs [N, {shape}]: {first_line(e)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what} gives {got} for 2 inputs; the data need logits [N, {num_classes}]")


def load_model(
    spec: str,
    weights: str | Path | None,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    options: dict[str, Any] | None = None,
    preprocess: Preprocess | None = None,
    key_map: dict[str, str] | None = None,
) -> LoadedModel:
    """The model ``spec`` names with ``weights`` loaded and ``preprocess`` folded in, in eval mode.

    ``weights`` is required for registry models, optional for Python factories (the model is used as
    the factory returns it) and TorchScript / ONNX files (they hold their weights; a state_dict given
    as well replaces them). Non-finite weights, outputs that are not ``[N, num_classes]`` logits, and
    every mismatch raise :class:`ConfigError` (one line). ``record`` (JSON-able): ``spec``, ``kind``,
    ``options``, ``model_sha256`` (of a model or code file), ``weights`` and its ``weights_sha256``, how
    the weights were matched (:class:`marginlab.nets.weights.LoadedWeights`), ``preprocess`` and the
    ``parameters`` count.
    """
    ms = resolve_spec(spec)
    if preprocess is not None:
        for key in ("mean", "std"):
            if len(preprocess[key]) not in (1, input_shape[0]):
                n, c = len(preprocess[key]), input_shape[0]
                raise ConfigError(f"--preprocess {key} has {n} values; the data have {c} channels")
    if weights is None and ms.kind == "registry":
        raise ConfigError(f"registry model {spec!r} needs its weights: --weights FILE")
    if options and ms.kind in ("torchscript", "onnx"):
        raise ConfigError(f"{spec} is a saved {ms.kind} model: it takes no --option")
    if ms.kind in ("registry", "python"):
        model = build_from_spec(ms, num_classes=num_classes, input_shape=input_shape, options=options)
    else:
        model = load_saved(ms)
    record: dict[str, Any] = {"spec": spec, "kind": ms.kind, "options": dict(options or {}), "weights": None}
    is_file = ms.kind in ("torchscript", "onnx") or ms.source.endswith(".py")
    record["model_sha256"] = file_sha256(Path(ms.source)) if is_file else None  # which code / archive ran
    if weights is not None:
        loaded = load_weights(model, weights, key_map=key_map)
        record |= asdict(loaded) | {"weights": str(weights), "weights_sha256": file_sha256(Path(weights))}
        del record["path"]
    elif key_map:
        raise ConfigError("--key-map renames the keys of --weights; give --weights too")
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # name the file the values came from, when they came from one
        where = f"weights file {weights}" if weights is not None else f"model {spec}"
        raise ConfigError(f"{where} holds NaN or infinite weights (first: {bad[0]!r})")
    if preprocess is not None:  # the first layer: attacks and eps stay in [0, 1] pixel space
        norm = Normalize(preprocess["mean"], preprocess["std"])
        model = nn.Sequential(OrderedDict(normalize=norm, model=model))
    record["preprocess"] = preprocess
    record["parameters"] = sum(t.numel() for t in model.parameters())
    model.eval()
    check_forward(model, input_shape, num_classes, f"model {spec!r}")
    log.info("loaded model %s (%s, %d parameters) with weights %s", spec, ms.kind, record["parameters"],
             record["weights"] or "from the model itself")  # fmt: skip
    return LoadedModel(model, record)


def __getattr__(name: str) -> Any:
    """The names ``marginlab.model_io`` had besides these (``parse_preprocess``, ``check_spec`` ...):
    deprecated aliases of their new homes (:data:`marginlab.base.deprecated.MOVED_NAMES`)."""
    return moved_attribute(__name__, name)
