"""How marginlab logs: one line per message, ``HH:MM:SS LEVEL [run] logger: message``.

Kept apart from :mod:`marginlab.training.progress` so that the CLI can set logging up without importing torch.
"""

from __future__ import annotations

import logging

# Progress bars are drawn only where one process owns the terminal; the worker processes of a sweep or a
# comparison share their parent's stderr (bars would overwrite each other), so they turn bars off.
_BARS_ALLOWED = True


def disable_bars() -> None:
    """Log epochs as lines in this process, never as progress bars (see :func:`bars_allowed`)."""
    global _BARS_ALLOWED
    _BARS_ALLOWED = False


def bars_allowed() -> bool:
    """False once :func:`disable_bars` was called in this process."""
    return _BARS_ALLOWED


def setup_logging(level: int, tag: str | None = None) -> None:
    """marginlab's own messages at ``level``; every other library at WARNING, so that ``-v`` shows no
    matplotlib font-manager debug and foolbox's ``INFO root:`` lines never appear. ``tag`` (a run's
    name) goes into every line: the worker processes of a sweep share one stderr."""
    where = f" [{tag}]" if tag else ""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("marginlab").setLevel(level)
