"""Architectures from the user's own code: a registry name or a Python callable, built with its options.

A ``python`` spec (:mod:`marginlab.nets.spec`) names ``path/to/file.py:ClassOrFactory`` or
``package.module:factory``. The file is imported as a fresh module (its folder on ``sys.path`` meanwhile,
so that it can import its siblings); the callable is called with the options as keyword arguments,
checked first against its signature and annotations, plus ``num_classes`` / ``input_shape`` from the data
when its signature takes them. Whatever the user's code raises becomes a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from marginlab.base.errors import ConfigError, MarginlabError
from marginlab.nets.models import MODELS, build_model, check_options
from marginlab.nets.spec import ModelSpec, resolve_spec


def first_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"`` (or the type name alone): a foreign error in one line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def model_factory(spec: ModelSpec) -> Callable[..., Any]:
    """The callable a registry or Python spec names (a Python file is imported; its errors: one line)."""
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
        raise ConfigError(f"cannot import {path}: {first_line(e)}") from None
    finally:
        sys.path.remove(folder)
    return module


def _import_module(name: str) -> ModuleType:
    """``importlib.import_module(name)``, any error as a one-line ConfigError."""
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise ConfigError(f"cannot import module {name!r}: {first_line(e)}") from None


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
        raise ConfigError(f"model {ms.spec!r} failed to build: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {ms.spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _parameters(factory: Callable[..., Any]) -> set[str]:
    """The parameter names of ``factory`` (none when its signature cannot be read)."""
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def check_spec(spec: str, options: dict[str, Any]) -> None:
    """Validate a train config's ``model.name`` and ``model.options`` before anything runs: a registry
    name or a Python factory (imported) whose signature takes the options."""
    ms = resolve_spec(spec)
    if ms.kind not in ("registry", "python"):
        raise ConfigError(f"model {spec!r} is a saved {ms.kind} model; training needs a registry name or "
                          "FILE.py:Class")  # fmt: skip
    check_options(model_factory(ms), options, f"model {spec!r}")
