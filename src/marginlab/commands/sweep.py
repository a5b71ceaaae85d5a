"""``marginlab sweep CONFIG [key=value ...] --grid key=v1,v2 ... [--out DIR] [--jobs N] [--launcher L]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marginlab.base.config import from_dict, load_config
from marginlab.base.errors import ConfigError
from marginlab.commands.args import add_launcher_arguments, int_arg, launcher_settings
from marginlab.lab.launchers import SlurmConfig
from marginlab.lab.names import SWEEP_MD
from marginlab.lab.slurm import make_launcher
from marginlab.sweep import run_sweep, stop_signal


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` sub-command to the CLI's sub-parsers."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of configs (restartable: finished runs are skipped) and tabulate their summaries",
    )
    p.add_argument("config", help="base TOML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid axis, e.g. --grid train.lr=0.01,0.002 --grid seed=0,1,2 (repeat for more axes)",
    )
    p.add_argument("--out", help="sweep directory (default: runs/<config name>-sweep)")
    p.add_argument(
        "--jobs", type=int_arg, default=1, help="runs at a time, each in its own process (default 1)"
    )
    p.add_argument("--keys", help="comma-separated summary keys for the table (default: all shared ones)")
    add_launcher_arguments(p)
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="with --launcher slurm: submit and return ('marginlab status OUT' follows the jobs; the same "
        "command again waits for those still running and writes the tables)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``marginlab sweep``: run the grid of configs (finished runs are skipped) and tabulate their summaries.

    Returns the exit status."""
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be a positive integer, got {args.jobs}")
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    name, table = launcher_settings(args)
    slurm = from_dict(SlurmConfig, table, "slurm")
    launcher = make_launcher(name or "local", jobs=args.jobs, slurm=slurm, wait=not args.no_wait)
    base = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-sweep")
    try:
        result = run_sweep(base, args.grid, out, jobs=args.jobs, keys=keys, launcher=launcher)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the workers are stopped, the tables written
        sig = stop_signal(e)
        print(
            f"marginlab: sweep {out} stopped by {sig.name}; rerun the same command to resume it",
            file=sys.stderr,
        )
        return 128 + sig  # the shell's convention for "ended by this signal": 130 for Ctrl-C
    if args.no_wait:
        todo = sum(r.mode != "skip" for r in result.records)
        print(
            f"sweep {out}: {todo} runs on SLURM, {len(result.records) - todo} already finished; "
            f"'marginlab status {out}' follows them, the same command again collects them"
        )
        return 0
    for r in result.records:
        note = " (already done)" if r.mode == "skip" else f": {r.error}" if r.error else ""
        print(f"{r.status:9s} {r.point.name}{note}")
    done = len(result.records) - len(result.failed)
    print(f"sweep {out}: {done}/{len(result.records)} runs finished; table in {out / SWEEP_MD} and .csv")
    return 1 if result.failed else 0
