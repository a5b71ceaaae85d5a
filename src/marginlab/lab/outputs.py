"""Where the commands that evaluate a model or draw from run directories may write, and under which lock.

``marginlab margins``, ``robustness``, ``plot`` and ``report`` write into directories that may belong to
runs. The rules, so that nothing finished is ever overwritten and no two processes write one directory:

- ``margins`` and ``robustness`` never write into a run directory (``config.json``) or a sweep directory
  (``sweep.json``) itself: there ``summary.json`` marks a run finished and ``robustness.json`` is a
  comparison sub-run's result, whichever run they would replace or fake. A folder *inside* one is fine.
- A file of the same name already in ``--out`` is replaced only when the same command wrote it: its JSON
  (``summary.json``, ``robustness.json``: the command's *anchor*) says so under :data:`WRITTEN_BY`
  (files from before that key: by their shape), and the command's other files (table, figure, arrays)
  belong to it when that anchor does, or, outside any run or sweep directory, when there is no anchor
  (the leftovers of a call killed before it wrote its JSON, which it writes last). Anything else is
  refused in one line.
- Writing anywhere at or inside a run or sweep directory takes that directory's lock
  (:meth:`marginlab.lab.runs.RunDir.lock`): while another process holds it the command stops with
  "... is in use by another process (pid N)".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from marginlab.base.errors import RunDirError
from marginlab.base.fsio import read_json
from marginlab.lab.names import CONFIG, SWEEP_MANIFEST
from marginlab.lab.runs import RunDir

# The key of a command's JSON output that names the command which wrote it ("marginlab margins").
WRITTEN_BY = "written_by"

# For JSON written before WRITTEN_BY existed: whether its content is that command's output.
Legacy = Callable[[dict[str, Any]], bool]


def written_by(command: str) -> dict[str, str]:
    """The entry that marks a JSON file as ``marginlab COMMAND``'s output (merge it into the JSON)."""
    return {WRITTEN_BY: f"marginlab {command}"}


def enclosing_run(path: str | Path) -> tuple[Path, str] | None:
    """The nearest run directory or sweep directory at or above ``path`` (which need not exist yet), with
    what it is (``"run directory"`` / ``"sweep directory"``); ``None`` when there is none."""
    p = Path(path).absolute()
    for d in (p, *p.parents):
        if (d / CONFIG).is_file():
            return d, "run directory"
        if (d / SWEEP_MANIFEST).is_file():
            return d, "sweep directory"
    return None


def check_output(
    out: Path,
    command: str,
    files: Sequence[str],
    *,
    anchor: str | None = None,
    legacy: Legacy | None = None,
) -> None:
    """Refuse ``--out`` when writing ``files`` into it could replace or fake a run's results (see the
    module docstring). ``anchor``: the command's JSON among ``files``, which tells whose the others are;
    ``None``: every file of ``files`` is the command's own whatever the directory holds (``report``)."""
    if anchor is None:
        return
    found = enclosing_run(out)
    if found is not None and found[0] == out.absolute():
        raise RunDirError(
            f"--out {out} is a {found[1]}: marginlab {command} does not write its {anchor} there (it "
            f"would stand for the run's own results); name a new directory, e.g. {out / command}"
        )
    if not out.is_dir():
        return
    mine = _is_own(out / anchor, command, legacy) if (out / anchor).exists() else None
    # Without its anchor a file is a run's (when inside a run or sweep directory: figures/robustness.png)
    # or the leftover of this command killed before its JSON (anywhere else), which may be replaced.
    free = mine is None and found is None
    for name in files:
        if (out / name).exists() and not (mine or free):
            raise RunDirError(
                f"--out {out} already holds {name}, which marginlab {command} did not write "
                f"({anchor} {'is not its own' if mine is False else 'is missing'}); choose another --out"
            )


def _is_own(path: Path, command: str, legacy: Legacy | None) -> bool:
    """Whether the JSON file ``path`` was written by ``marginlab COMMAND`` (unreadable: no)."""
    try:
        raw = read_json(path)
    except (OSError, ValueError):
        return False
    if not isinstance(raw, dict):
        return False
    if WRITTEN_BY in raw:
        return bool(raw[WRITTEN_BY] == f"marginlab {command}")
    return legacy is not None and legacy(raw)


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold the lock of the run or sweep directory that ``out`` lies in (nothing when it lies in none)."""
    found = enclosing_run(out)
    if found is None:
        yield
        return
    rd = RunDir(found[0])
    rd.lock(found[1])
    try:
        yield
    finally:
        rd.unlock()


@contextmanager
def writing_into(
    out: Path,
    command: str,
    files: Sequence[str],
    *,
    anchor: str | None = None,
    legacy: Legacy | None = None,
) -> Iterator[None]:
    """:func:`check_output`, then hold :func:`output_lock` while the command computes and writes (the
    check is made again under the lock, since another process may have written meanwhile)."""
    check_output(out, command, files, anchor=anchor, legacy=legacy)
    with output_lock(out):
        check_output(out, command, files, anchor=anchor, legacy=legacy)
        yield
