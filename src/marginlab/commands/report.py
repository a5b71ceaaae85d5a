"""``marginlab report RUN_DIR... [--out DIR] [--title T]``: an HTML and a Markdown report."""

from __future__ import annotations

import argparse

from marginlab.lab.names import REPORT_HTML, REPORT_MD
from marginlab.report import write_report


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command to the CLI's sub-parsers."""
    p = sub.add_parser(
        "report",
        help=f"write {REPORT_HTML} (self-contained) and {REPORT_MD} for one run or a comparison of several",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or sweep directories")
    p.add_argument("--out", help="output directory (default: the directory given, if one, else ./report)")
    p.add_argument("--title", help="report title")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``marginlab report``: write the HTML and Markdown report of the run directories.

    Returns the exit status."""
    html_path, md_path = write_report(args.run_dirs, args.out, args.title)
    print(f"report written: {html_path} and {md_path}")
    return 0
