"""Render report blocks as one self-contained HTML page and as Markdown.

HTML: every figure is embedded as a base64 ``data:image/png`` URI and the CSS is inline, so the page has
no external resources and can be mailed or archived as one file; all text from run files is escaped with
``html.escape``. Markdown: figures are linked by relative path (the caller decides where they live).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Sequence
from urllib.parse import quote

from marginlab.report.document import Block, Code, Figure, Heading, Table, Text
from marginlab.report.tables import markdown_table

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 4em; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; white-space: nowrap; }
th { background: #f5f5f5; }
tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
details summary { cursor: pointer; color: #555; margin: .8em 0; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: .4em .8em; font-weight: 600; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #666; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A complete, self-contained HTML5 document."""
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _html_block(block: Block) -> str:
    e = html.escape
    match block:
        case Heading(level, text):
            return f"<h{level}>{e(text)}</h{level}>"
        case Text(text, warning):
            return f'<p class="warning">{e(text)}</p>' if warning else f"<p>{e(text)}</p>"
        case Table(header, rows):
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>\n" for row in rows)
            return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"
        case Code(text, _lang, collapsed):
            pre = f"<pre><code>{e(text)}</code></pre>"
            return f"<details><summary>{e(collapsed)}</summary>\n{pre}\n</details>" if collapsed else pre
        case Figure(path, caption, run_label):
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            alt = e(f"{run_label}: {caption}")
            return (
                f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
    raise TypeError(f"unknown report block {block!r}")


def render_markdown(blocks: Sequence[Block], link: Callable[[Figure], str]) -> str:
    """GitHub-flavoured Markdown; ``link(figure)`` gives each figure's relative path from the .md file."""
    parts = [_md_block(b, link) for b in blocks]
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def _md_block(block: Block, link: Callable[[Figure], str]) -> str:
    match block:
        case Heading(level, text):
            return f"{'#' * level} {md_escape(text)}"
        case Text(text, warning):
            return f"> **{md_escape(text)}**" if warning else md_escape(text)
        case Table(header, rows):
            return markdown_table(header, rows)
        case Code(text, lang, collapsed):
            fence = "`" * max(3, _longest_backtick_run(text) + 1)  # a fence the content cannot close
            code = f"{fence}{lang}\n{text.rstrip()}\n{fence}"
            return f"{md_escape(collapsed)}:\n\n{code}" if collapsed else code
        case Figure(_path, caption, run_label):
            return f"![{md_escape(f'{run_label}: {caption}')}]({quote(link(block), safe='/=,+')})"
    raise TypeError(f"unknown report block {block!r}")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}<>#|!])")


def md_escape(text: str) -> str:
    """Backslash-escape Markdown syntax (and raw HTML) in text taken from run files; one line."""
    return _MD_SPECIAL.sub(r"\\\1", text.replace("\n", " "))


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)
