"""Provenance: what ran, where and with what, recorded into every run directory.

``provenance.json`` holds one entry per session that worked on the run (the first run, then every
resume): marginlab's version and git commit (when it runs from a checkout), the versions of the
libraries that decide the numbers, the command line, the host, the device and the CPU thread count.
The resolved config itself is ``config.json``; together they say exactly what produced the results.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import torch

from marginlab import __version__
from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import atomic_write_json, file_sha256, read_json
from marginlab.lab.runs import PROVENANCE
from marginlab.nets.spec import resolve_spec

_command: list[str] | None = None  # set by the CLI: the arguments it was given, not the host's argv


def set_command(argv: list[str]) -> None:
    """Record the command line being run (the CLI calls this with ``["marginlab", *args]``)."""
    global _command
    _command = list(argv)


PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "foolbox", "pyautoattack", "matplotlib")


class GitCommit(TypedDict):
    """The checkout marginlab runs from: its HEAD ``commit`` and whether tracked files were modified."""

    commit: str
    dirty: bool


class Session(TypedDict):
    """One entry of ``provenance.json``'s ``sessions``: a process that worked on the run (see the module
    docstring); ``packages`` maps each of :data:`PACKAGES` to its version (``None``: not installed),
    ``cuda`` is the GPU's name (``None`` without one)."""

    mode: Literal["new", "resume"]
    started: str
    marginlab: str
    git: GitCommit | None
    packages: dict[str, str | None]
    python: str
    command: list[str]
    cwd: str
    host: str
    platform: str
    cpu_count: int | None
    torch_threads: int
    cuda: str | None
    world_size: int
    model_files: NotRequired[dict[str, str]]


def git_commit() -> GitCommit | None:
    """The commit of the checkout marginlab is imported from (``None`` when not a git checkout)."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)} if head else None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def session_info(mode: Literal["new", "resume"]) -> Session:
    """This process's entry: ``mode`` is ``new`` or ``resume``."""
    cuda = torch.cuda.is_available()
    return {
        "mode": mode,
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "marginlab": __version__,
        "git": git_commit(),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "command": _command if _command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def record_session(
    run_dir: str | Path, mode: Literal["new", "resume"], config: Mapping[str, Any] | None = None
) -> None:
    """Append this session's entry to ``provenance.json`` (atomically; earlier entries are kept), with
    the SHA-256 of the user's model file that ``config`` (the run's config) names (:func:`model_files`)."""
    path = Path(run_dir) / PROVENANCE
    entries = _sessions(path)
    session = session_info(mode)
    files = model_files(config) if config is not None else {}
    if files:
        session["model_files"] = files
    atomic_write_json(path, {"sessions": [*entries, session]})


def _sessions(path: Path) -> list[Any]:
    """The sessions ``provenance.json`` lists, as read (older versions may have other keys); a damaged
    file must not stop a resume: it reads as none, and the next session's file replaces it."""
    if not path.is_file():
        return []
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return []
    sessions = old.get("sessions", []) if isinstance(old, dict) else []
    return list(sessions) if isinstance(sessions, list) else []


def model_files(config: Mapping[str, Any]) -> dict[str, str]:
    """``{file: SHA-256}`` of the Python file whose code a run's config builds its model from
    (``model.name = "FILE.py:Class"``, the file as the config spells it); ``{}`` for registry models,
    importable modules and a file that is not there (building the model then says so)."""
    model = config.get("model")
    name = model.get("name") if isinstance(model, Mapping) else None
    if not isinstance(name, str):
        return {}
    try:
        spec = resolve_spec(name)  # parses only: nothing is imported
    except ConfigError:
        return {}
    if spec.kind != "python" or not spec.source.endswith(".py"):
        return {}
    try:
        return {spec.source: file_sha256(spec.source)}
    except OSError:
        return {}


def check_model_files(run_dir: str | Path, config: Mapping[str, Any]) -> None:
    """Refuse to resume a run whose model file changed since it started: :class:`RunDirError` naming the
    file, unless its SHA-256 equals the one the latest session that recorded it wrote into
    ``provenance.json`` (runs from before these records, and registry models, pass)."""
    recorded: dict[str, Any] = {}
    for session in _sessions(Path(run_dir) / PROVENANCE):
        files = session.get("model_files") if isinstance(session, dict) else None
        if isinstance(files, dict):
            recorded = files
    for file, digest in model_files(config).items():
        if file in recorded and recorded[file] != digest:
            raise RunDirError(
                f"model file {file} changed since run {run_dir} started (its SHA-256 differs from the one "
                f"in {PROVENANCE}); revert it, or resume with the file as it is now: "
                f"marginlab run --resume {run_dir} --force"
            )
