"""``marginlab plot RUN_DIR ...``: redraw a run's figures from its files alone."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="redraw the figures of one or more run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from marginlab.runner import plot_run

    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(path)
    return 0
