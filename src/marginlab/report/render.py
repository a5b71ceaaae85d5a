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

from marginlab.base.tables import markdown_table
from marginlab.report.blocks import Block, Bullets, Claims, Code, Figure, Heading, Table, Text
from marginlab.report.claims import FAILS, HOLDS, Claim

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1em 1.5em 4em; box-sizing: border-box; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin: .2em 0 .4em; font-size: 1.6em; }
h3 { margin: .8em 0 .3em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
h2#findings { margin-top: .6em; }
.scroll { max-width: 100%; overflow-x: auto; margin: .8em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
td { white-space: nowrap; }
td.long { white-space: normal; overflow-wrap: anywhere; min-width: 16em; }
th { background: #f5f5f5; overflow-wrap: anywhere; }
tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
details summary { cursor: pointer; color: #555; margin: .8em 0; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: .4em .8em; font-weight: 600; }
ul.claims { list-style: none; padding-left: 0; margin: .3em 0 .8em; }
ul.claims li { margin: .15em 0; padding: .15em .6em; border-left: 4px solid #bbb; background: #f8f8f8; }
ul.claims li.holds { border-color: #2e7d32; }
ul.claims li.fails { border-color: #c62828; }
.verdict { font-weight: 700; margin-right: .4em; white-space: nowrap; }
li.holds .verdict { color: #2e7d32; }
li.fails .verdict { color: #c62828; }
li.other .verdict { color: #666; }
.evidence { color: #555; font-size: 13px; }
.evidence::before { content: " — "; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #666; }
"""

LONG_CELL = 40  # characters: such a cell wraps instead of widening its table

VERDICT_MARKS = {HOLDS: ("✔", "holds"), FAILS: ("✘", "fails")}


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
        case Heading(level, text, anchor):
            ident = f' id="{e(anchor)}"' if anchor else ""
            return f"<h{level}{ident}>{e(text)}</h{level}>"
        case Text(text, warning):
            return f'<p class="warning">{e(text)}</p>' if warning else f"<p>{e(text)}</p>"
        case Bullets(items):
            return "<ul>\n" + "".join(f"<li>{e(item)}</li>\n" for item in items) + "</ul>"
        case Claims(items):
            return '<ul class="claims">\n' + "".join(_html_claim(c) for c in items) + "</ul>"
        case Table(header, rows):
            head = "".join(f"<th>{_breakable(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>\n" for row in rows)
            # the wrapper scrolls sideways when a table is still wider than the page
            table = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"
            return f'<div class="scroll">{table}</div>'
        case Code(text, _lang, collapsed):
            pre = f"<pre><code>{e(text)}</code></pre>"
            return f"<details><summary>{e(collapsed)}</summary>\n{pre}\n</details>" if collapsed else pre
        case Figure(path, caption, run_label, description):
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            alt = e(f"{run_label}: {description or caption}")
            text = f"{run_label}: {caption}" + (f" ({description})" if description else "")
            return (
                f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption>{e(text)}</figcaption></figure>"
            )
    raise TypeError(f"unknown report block {block!r}")


def _html_claim(claim: Claim) -> str:
    e = html.escape
    mark, css = VERDICT_MARKS.get(claim.verdict, ("•", "other"))
    evidence = f'<span class="evidence">{e(claim.evidence)}</span>' if claim.evidence else ""
    return (
        f'<li class="{css}"><span class="verdict">{mark} {e(claim.verdict)}</span>'
        f"<span>{e(claim.text)}</span>{evidence}</li>\n"
    )


def _html_cell(text: str) -> str:
    return (
        f'<td class="long">{html.escape(text)}</td>'
        if len(text) > LONG_CELL
        else f"<td>{html.escape(text)}</td>"
    )


def _breakable(header: str) -> str:
    """An escaped header that may wrap after its dots and underscores (long dotted metric names)."""
    return re.sub(r"([._])", r"\1<wbr>", html.escape(header))


def render_markdown(blocks: Sequence[Block], link: Callable[[Figure], str]) -> str:
    """GitHub-flavoured Markdown; ``link(figure)`` gives each figure's relative path from the .md file."""
    parts = [_md_block(b, link) for b in blocks]
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def _md_block(block: Block, link: Callable[[Figure], str]) -> str:
    match block:
        case Heading(level, text, _anchor):
            return f"{'#' * level} {md_escape(text)}"
        case Text(text, warning):
            return f"> **{md_escape(text)}**" if warning else md_escape(text)
        case Bullets(items):
            return "\n".join(f"- {md_escape(item)}" for item in items)
        case Claims(items):
            return "\n".join(_md_claim(c) for c in items)
        case Table(header, rows):
            return markdown_table(header, rows)
        case Code(text, lang, collapsed):
            fence = "`" * max(3, _longest_backtick_run(text) + 1)  # a fence the content cannot close
            code = f"{fence}{lang}\n{text.rstrip()}\n{fence}"
            return f"{md_escape(collapsed)}:\n\n{code}" if collapsed else code
        case Figure(_path, caption, run_label, description):
            image = f"![{md_escape(f'{run_label}: {caption}')}]({quote(link(block), safe='/=,+')})"
            return f"{image}\n\n*{md_escape(description)}*" if description else image
    raise TypeError(f"unknown report block {block!r}")


def _md_claim(claim: Claim) -> str:
    mark, _css = VERDICT_MARKS.get(claim.verdict, ("•", ""))
    line = f"- {mark} **{claim.verdict}**: {md_escape(claim.text)}"
    return line + (f" ({md_escape(claim.evidence)})" if claim.evidence else "")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}<>#|!])")


def md_escape(text: str) -> str:
    """Backslash-escape Markdown syntax (and raw HTML) in text taken from run files; one line."""
    return _MD_SPECIAL.sub(r"\\\1", text.replace("\n", " "))


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)
