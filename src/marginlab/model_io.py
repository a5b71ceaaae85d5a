"""Turn a model spec and a weights file into an eval-mode ``nn.Module``, and record what was loaded.

A spec (``--model`` of ``marginlab margins`` / ``robustness``, ``model.name`` of a train config) is one of

- a registry name of :data:`marginlab.models.MODELS` (``mnist-mlp``), built with its options;
- ``path/to/file.py:ClassOrFactory`` or ``package.module:factory``: any callable returning an
  ``nn.Module``; options become keyword arguments (checked against its signature and annotations),
  and ``num_classes`` / ``input_shape`` are passed from the data when it takes them;
- a TorchScript archive (``torch.jit.save``), recognised by its content whatever its suffix;
- an ``.onnx`` file, converted by onnx2torch (the optional extra ``marginlab[onnx]``).

Weights (a state_dict or a checkpoint, see :mod:`marginlab.weights`) are loaded into the built model;
``preprocess`` folds input normalisation into the model as a first layer (:class:`Normalize`), so that
attacks, bounds and ε all live in [0, 1] pixel space (as foolbox's ``preprocessing`` does).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from marginlab.errors import ConfigError, MarginlabError

log = logging.getLogger(__name__)
KINDS = ("registry", "python", "torchscript", "onnx")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
ONNX_HINT = (
    "pip install 'marginlab[onnx]' (onnx2torch; it imports torchvision, which needs a torchvision build "
    "matching this torch: the CPU torch wheel has none on PyPI)"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` (one of :data:`KINDS`), the spec as given, the file or module it names
    (``source``) and, for Python specs, the attribute to call (``attr``)."""

    kind: str
    spec: str
    source: str = ""
    attr: str = ""


@dataclass(frozen=True)
class LoadedModel:
    """An eval-mode model and the JSON-able record of how it was loaded (see :func:`load_model`)."""

    model: nn.Module
    record: dict[str, Any]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer: ``x [N, C, H, W]`` in [0, 1] ->
    the input scale the model was trained on. ``mean`` and ``std`` are buffers shaped ``[1, C, 1, 1]``
    (C = 1 broadcasts over every channel)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def resolve_spec(spec: str) -> ModelSpec:
    """Classify ``spec`` without importing or loading anything (cheap checks first, one-line errors)."""
    from marginlab.models import MODELS

    spec = str(spec).strip()
    if spec in MODELS:
        return ModelSpec("registry", spec, spec)
    source, colon, attr = spec.rpartition(":")
    if colon and _DOTTED.match(attr) and (source.endswith(".py") or _DOTTED.match(source)):
        if source.endswith(".py") and not Path(source).is_file():
            raise ConfigError(f"model file {source} not found")
        return ModelSpec("python", spec, source, attr)
    path = Path(spec)
    if path.suffix == ".py":
        raise ConfigError(f"name the class or factory to call in {spec}: --model {spec}:ClassOrFactory")
    if path.is_file():
        return ModelSpec(_saved_kind(path), spec, spec)
    if path.suffix in (".onnx", ".pt", ".pth", ".pt2", ".jit", ".ts") or "/" in spec:
        raise ConfigError(f"model file {spec} not found")
    raise ConfigError(
        f"unknown model {spec!r}; give a registry name ({', '.join(MODELS.names())}), FILE.py:Class, "
        "package.module:factory, a TorchScript file or an .onnx file"
    )


def _saved_kind(path: Path) -> str:
    """``torchscript`` or ``onnx`` for a saved model file; a state_dict file is an error with a hint."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        # a TorchScript archive carries its compiled code and constants; torch.save files do not
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        raise ConfigError(
            f"{path} holds weights (a torch.save file), not a model: pass it as --weights, with --model "
            "naming the architecture (a registry name or FILE.py:Class)"
        )
    raise ConfigError(f"model file {path} is neither a TorchScript archive nor an ONNX file (.onnx)")


def model_factory(spec: ModelSpec) -> Callable[..., Any]:
    """The callable a registry or Python spec names (a Python file is imported; its errors: one line)."""
    from marginlab.models import MODELS

    if spec.kind == "registry":
        return MODELS.get(spec.spec)
    if spec.kind != "python":
        raise ConfigError(f"{spec.spec} is a saved {spec.kind} model, not an architecture to build")
    module = _import_file(Path(spec.source)) if spec.source.endswith(".py") else _import_module(spec.source)
    obj: Any = module
    for part in spec.attr.split("."):
        if not hasattr(obj, part):
            mine = [
                v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__
            ]
            classes = [c.__name__ for c in mine if issubclass(c, nn.Module)]
            found = f"; nn.Module classes there: {', '.join(classes)}" if classes else ""
            raise ConfigError(f"{spec.source} has no {spec.attr!r}{found}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec.spec} is a {type(obj).__name__}, not a class or function")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _import_file(path: Path) -> ModuleType:
    """Import ``path`` as a fresh module (its folder on ``sys.path`` meanwhile, for sibling imports)."""
    name = "marginlab_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"cannot import {path} as Python")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error is reported in one line
        sys.modules.pop(name, None)
        raise ConfigError(f"cannot import {path}: {_first_line(e)}") from None
    finally:
        sys.path.remove(folder)
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise ConfigError(f"cannot import module {name!r}: {_first_line(e)}") from None


def build_from_spec(
    spec: str | ModelSpec,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """A freshly initialised model from a registry or Python spec, with ``options`` checked against the
    factory's signature. ``num_classes`` and ``input_shape`` come from the data (passed to a Python
    factory only when its signature takes them)."""
    from marginlab.models import build_model, check_options

    ms = spec if isinstance(spec, ModelSpec) else resolve_spec(spec)
    options = dict(options or {})
    if ms.kind == "registry":
        return build_model(ms.spec, num_classes=num_classes, input_shape=tuple(input_shape), **options)
    factory = model_factory(ms)
    check_options(factory, options, f"model {ms.spec!r}")
    params = _parameters(factory)
    given = {"num_classes": num_classes, "input_shape": tuple(input_shape)}
    options |= {k: v for k, v in given.items() if k in params}
    try:
        model = factory(**options)
    except MarginlabError:
        raise
    except Exception as e:  # the user's code
        raise ConfigError(f"model {ms.spec!r} failed to build: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {ms.spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _parameters(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def check_spec(spec: str, options: dict[str, Any]) -> None:
    """Validate a train config's ``model.name`` and ``model.options`` before anything runs: a registry
    name or a Python factory (imported) whose signature takes the options."""
    from marginlab.models import check_options

    ms = resolve_spec(spec)
    if ms.kind not in ("registry", "python"):
        raise ConfigError(f"model {spec!r} is a saved {ms.kind} model; training needs a registry name or "
                          "FILE.py:Class")  # fmt: skip
    check_options(model_factory(ms), options, f"model {spec!r}")


def load_saved(spec: ModelSpec) -> nn.Module:
    """A TorchScript archive (``torch.jit.load``) or an ONNX file (onnx2torch) as an ``nn.Module``."""
    path = Path(spec.source)
    if spec.kind == "torchscript":
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream; the user chose the file
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ConfigError(f"cannot load TorchScript model {path}: {_first_line(e)}") from None
    try:
        from onnx2torch import convert
    except Exception as e:  # not installed, or its torchvision import fails beside this torch
        raise ConfigError(
            f"ONNX models need the optional extra: {ONNX_HINT}; here: {_first_line(e)}"
        ) from None
    try:
        return convert(str(path))
    except Exception as e:
        raise ConfigError(f"cannot convert ONNX model {path}: {_first_line(e)}") from None


def parse_preprocess(text: str | None) -> dict[str, list[float]] | None:
    """``"mean=0.1307,std=0.3081"`` or ``"mean=0.49,0.48,0.45,std=0.25,0.24,0.26"`` -> ``{"mean": [...],
    "std": [...]}`` (an unset one is 0 / 1); ``None``, ``""`` or ``"none"`` -> ``None``."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    out: dict[str, list[float]] = {}
    key = None
    for token in (t.strip() for t in str(text).split(",")):
        if "=" in token:
            key, _, token = (s.strip() for s in token.partition("="))
            if key not in ("mean", "std") or key in out:
                raise ConfigError(f"--preprocess takes mean=... and std=... once each, got {key!r}")
            out[key] = []
        if key is None:
            raise ConfigError(f"--preprocess must look like mean=0.1307,std=0.3081, got {text!r}")
        try:
            out[key].append(float(token))
        except ValueError:
            raise ConfigError(f"--preprocess {key} values must be numbers, got {token!r}") from None
    mean, std = out.get("mean", [0.0]), out.get("std", [1.0])
    if not all(torch.isfinite(torch.tensor(mean + std))) or min(std) <= 0:
        raise ConfigError(f"--preprocess needs finite means and positive stds, got {text!r}")
    return {"mean": mean, "std": std}


def check_forward(model: nn.Module, input_shape: Sequence[int], num_classes: int, what: str) -> None:
    """One forward pass on zeros ``[2, C, H, W]`` must give logits ``[2, num_classes]`` (else one line)."""
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
    except Exception as e:
        shape = ", ".join(str(s) for s in input_shape)
        raise ConfigError(f"{what} fails on the data's inputs [N, {shape}]: {_first_line(e)}") from None
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
    preprocess: dict[str, list[float]] | None = None,
    key_map: dict[str, str] | None = None,
) -> LoadedModel:
    """The model ``spec`` names with ``weights`` loaded and ``preprocess`` folded in, in eval mode.

    ``weights`` is required for registry models, optional for Python factories (the model is used as
    the factory returns it) and TorchScript / ONNX files (they hold their weights; a state_dict given
    as well replaces them). Non-finite weights, outputs that are not ``[N, num_classes]`` logits, and
    every mismatch raise :class:`ConfigError` (one line). ``record`` (JSON-able): ``spec``, ``kind``,
    ``options``, ``model_sha256`` (of a model or code file), ``weights`` and its ``weights_sha256``, how
    the weights were matched (:class:`marginlab.weights.LoadedWeights`), ``preprocess`` and the
    ``parameters`` count.
    """
    from marginlab.weights import load_weights

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
    record["model_sha256"] = _sha256(Path(ms.source)) if is_file else None  # which code / archive ran
    if weights is not None:
        loaded = load_weights(model, weights, key_map=key_map)
        record |= asdict(loaded) | {"weights": str(weights), "weights_sha256": _sha256(Path(weights))}
        del record["path"]
    elif key_map:
        raise ConfigError("--key-map renames the keys of --weights; give --weights too")
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"model {spec} holds NaN or infinite weights (first: {bad[0]!r})")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
