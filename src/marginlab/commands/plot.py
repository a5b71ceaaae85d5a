"""``marginlab plot RUN_DIR ...``: redraw a run's figures from its files alone."""

from __future__ import annotations

import argparse

from marginlab.experiments import plot_run


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plot`` sub-command to the CLI's sub-parsers."""
    p = sub.add_parser("plot", help="redraw the figures of one or more run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``marginlab plot``: redraw the figures of each run directory and print their paths.

    Returns the exit status."""
    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(path)
    return 0
