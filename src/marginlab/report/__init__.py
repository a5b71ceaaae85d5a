"""Reports: one self-contained ``report.html`` and the same content as ``report.md``.

``write_report(run_dirs, out_dir, title)`` reads run directories (never live training state) and writes

- ``report.html``: inline CSS, every figure embedded as a base64 PNG data URI, configs in collapsible
  blocks; no external resources, so the single file can be archived or mailed;
- ``report.md``: the same headings and tables; figures are linked by relative path. Figures that lie
  inside ``out_dir`` (the default for a one-run report, written into the run directory) are linked where
  they are; others are copied to ``out_dir/report-figures/<run>/`` so the Markdown survives being moved
  together with its folder.

Unfinished runs (no ``summary.json``) are included with a visible "unfinished" mark; directories that are
not runs, or hold corrupt JSON, raise a one-line :class:`~marginlab.base.errors.RunDirError`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from marginlab.base.deprecated import moved_attribute
from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import atomic_write_bytes, atomic_write_text
from marginlab.lab.names import REPORT_FIGURES, REPORT_HTML, REPORT_MD
from marginlab.report.blocks import Block, Figure
from marginlab.report.collect import RunInfo, load_runs
from marginlab.report.document import build_document, missing_figures_note
from marginlab.report.render import render_html, render_markdown

log = logging.getLogger(__name__)

__all__ = ["RunInfo", "default_out_dir", "load_runs", "write_report"]


def __getattr__(name: str) -> Any:
    """Old names (``HTML_NAME``, ``MD_NAME``, ``FIGURE_COPIES``: now ``marginlab.lab.names.REPORT_*``),
    with a DeprecationWarning."""
    return moved_attribute(__name__, name)


def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """The directory itself when one (run or sweep) directory is given, else ``./report``."""
    return Path(run_dirs[0]) if len(run_dirs) == 1 else Path("report")


def write_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, title: str | None = None
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` about ``run_dirs`` into ``out_dir``; return both paths."""
    if out_dir is not None and not str(out_dir).strip():  # Path("") is ".": never a silent default
        raise ConfigError("the report's output directory is empty; name one (--out DIR)")
    runs = load_runs(run_dirs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    if title is None:
        title = (
            f"marginlab report: {runs[0].label}" if len(runs) == 1 else f"marginlab report: {len(runs)} runs"
        )
    for run in runs:
        if run.missing_figures:  # said in the report too; one line here so that it is not overlooked
            log.warning("%s", missing_figures_note(run))
    blocks = build_document(runs, title)
    try:
        html_text = render_html(blocks, title)  # reads every figure before anything is written
    except OSError as e:
        raise RunDirError(f"cannot read {e.filename}: {e.strerror or e}") from None
    html_path, md_path = out / REPORT_HTML, out / REPORT_MD
    created: list[Path] = [p for p in (out, out / REPORT_FIGURES) if not p.exists()]
    try:
        links = _place_figures(blocks, out, created)
        md_text = render_markdown(blocks, lambda fig: links[fig.path])
        for path, text in ((md_path, md_text), (html_path, html_text)):
            created += [] if path.exists() else [path]
            atomic_write_text(path, text)
    except OSError as e:
        _remove(created)  # a report is either complete or absent
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise RunDirError(f"cannot write the report to {out}: {reason}") from None
    return html_path, md_path


def _place_figures(blocks: Sequence[Block], out: Path, created: list[Path]) -> dict[Path, str]:
    """Relative links (from ``out``) for every figure, copying those that lie outside ``out``."""
    links: dict[Path, str] = {}
    root = out.resolve()
    for fig in (b for b in blocks if isinstance(b, Figure)):
        src = fig.path.resolve()
        if src.is_relative_to(root):
            links[fig.path] = src.relative_to(root).as_posix()
            continue
        rel = Path(REPORT_FIGURES, _safe(fig.run_label), fig.caption)
        created += [] if (out / rel).exists() else [out / rel]
        atomic_write_bytes(out / rel, fig.path.read_bytes())
        links[fig.path] = rel.as_posix()
    return links


def _remove(created: list[Path]) -> None:
    """Remove files and directories this call created (directories only when it created them)."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _safe(label: str) -> str:
    """A run label as one filesystem-safe directory name."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", label).lstrip(".") or "run"
