"""What a model spec names, decided from the text and the file alone (nothing is imported or loaded).

A spec (``--model`` of ``marginlab margins`` / ``robustness``, ``model.name`` of a train config) is one of
the :data:`KINDS`:

- ``registry``: a name of :data:`marginlab.nets.models.MODELS` (``mnist-mlp``);
- ``python``: ``path/to/file.py:ClassOrFactory`` or ``package.module:factory``, a callable returning an
  ``nn.Module`` (built by :mod:`marginlab.nets.usercode`);
- ``torchscript``: a ``torch.jit.save`` archive, recognised by its content whatever its suffix;
- ``onnx``: an ``.onnx`` file (converted by onnx2torch in :mod:`marginlab.nets.loading`).

A ``torch.save`` file of weights given as the model is an error that says to pass it as ``--weights``.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from marginlab.base.errors import ConfigError
from marginlab.nets.models import MODELS

KINDS = ("registry", "python", "torchscript", "onnx")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` (one of :data:`KINDS`), the spec as given, the file or module it names
    (``source``) and, for Python specs, the attribute to call (``attr``)."""

    kind: str
    spec: str
    source: str = ""
    attr: str = ""


def resolve_spec(spec: str) -> ModelSpec:
    """Classify ``spec`` without importing or loading anything (cheap checks first, one-line errors)."""
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


def _zip_names(path: Path) -> list[str] | None:
    """The member names of a zip archive (TorchScript and torch.save files are zips); ``None`` for any
    other file. A damaged archive raises ``zipfile``'s or the OS's error."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        return z.namelist()


def _saved_kind(path: Path) -> str:
    """``torchscript`` or ``onnx`` for a saved model file; a state_dict file is an error with a hint."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    try:
        names = _zip_names(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:  # even is_zipfile can raise
        raise ConfigError(f"model file {path} is a damaged archive ({e})") from None
    if names is not None:
        # a TorchScript archive carries its compiled code and constants; torch.save files do not
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        raise ConfigError(
            f"{path} holds weights (a torch.save file), not a model: pass it as --weights, with --model "
            "naming the architecture (a registry name or FILE.py:Class)"
        )
    raise ConfigError(f"model file {path} is neither a TorchScript archive nor an ONNX file (.onnx)")
