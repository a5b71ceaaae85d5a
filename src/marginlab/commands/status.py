"""``marginlab status DIR``: every run of a sweep or comparison, launched here or on SLURM, and its state."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from marginlab.base.errors import RunDirError
from marginlab.lab.status import STATES, RunStatus, run_statuses


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``status`` sub-command to the CLI's sub-parsers."""
    p = sub.add_parser(
        "status",
        help="each run of a sweep or comparison: queued, running (epoch/total), finished, failed or "
        "interrupted, with SLURM job ids and log files",
    )
    p.add_argument("dir", help="a sweep directory or a comparison's run directory")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``marginlab status``: print one line per run and a count per state. Returns the exit status."""
    home = Path(args.dir)
    if not home.is_dir():
        raise RunDirError(f"{home} is not a directory")
    runs = run_statuses(home)
    for line in format_status(runs):
        print(line)
    counts = Counter(r.state for r in runs)
    print(f"{home}: {len(runs)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s]))
    return 0


def format_status(runs: list[RunStatus]) -> list[str]:
    """Aligned columns ``run  state  epoch/total  job  log``; a failed run's error on the next line."""
    rows = [
        [
            r.name,
            r.state,
            "" if r.epoch is None else f"{r.epoch}/{r.total if r.total is not None else '?'}",
            r.job_id or "",
            r.log or "",
        ]
        for r in runs
    ]
    header = ["run", "state", "epoch", "job", "log"]
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for r, row in zip(runs, rows, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if r.error:
            lines.append(f"    error: {r.error}")
    return lines
