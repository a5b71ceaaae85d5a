"""The building blocks of a report: format-neutral content that the renderers turn into HTML and Markdown.

Block text is raw (unescaped) file content; each renderer escapes it for its own format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from marginlab.report.claims import Claim


@dataclass(frozen=True)
class Heading:
    """A section heading of ``level`` 1-6, with an optional HTML ``anchor``."""

    level: int
    text: str
    anchor: str | None = None  # an HTML id, for links and for tests that look for a section


@dataclass(frozen=True)
class Text:
    """A paragraph; ``warning`` marks it visibly."""

    text: str
    warning: bool = False  # drawn as a visible mark (e.g. an unfinished run)


@dataclass(frozen=True)
class Bullets:
    """A bulleted list, one item per string."""

    items: list[str]


@dataclass(frozen=True)
class Claims:
    """The claims checked against the runs' files, each with its verdict."""

    items: list[Claim]


@dataclass(frozen=True)
class Table:
    """A table of text cells: one ``header`` row and the ``rows``, each as long as the header."""

    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Code:
    """A code block in language ``lang`` (``""``: plain), folded under ``collapsed`` when given."""

    text: str
    lang: str = ""
    collapsed: str | None = None  # a summary line: the block starts folded (HTML <details>)


@dataclass(frozen=True)
class Figure:
    """An image file of a run (``run_label``) with its caption and an optional description."""

    path: Path
    caption: str  # path under figures/ or the run directory (also the name of a copied figure)
    run_label: str
    description: str = ""


Block = Heading | Text | Bullets | Claims | Table | Code | Figure
