"""``marginlab report RUN_DIR... [--out DIR] [--title T]``: an HTML and a Markdown report."""

from __future__ import annotations

import argparse
from pathlib import Path

from marginlab.lab.names import REPORT_HTML, REPORT_MD
from marginlab.lab.outputs import output_lock
from marginlab.report import default_out_dir, write_report


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
    out = Path(args.out) if args.out is not None else default_out_dir(args.run_dirs)
    # report.html / report.md / report-figures are only ever the report's own files; inside a run or
    # sweep directory (the default: the directory given) it writes under that directory's lock
    with output_lock(out):
        html_path, md_path = write_report(args.run_dirs, out, args.title)
    print(f"report written: {html_path} and {md_path}")
    return 0
