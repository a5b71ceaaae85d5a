"""``marginlab run CONFIG [key=value ...]`` and ``marginlab run --resume RUN_DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from marginlab.base.config import load_config, merge_overrides
from marginlab.base.errors import ConfigError
from marginlab.commands.args import add_launcher_arguments, launcher_settings
from marginlab.experiments import resume_experiment, run_experiment, run_or_resume


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` sub-command to the CLI's sub-parsers."""
    p = sub.add_parser("run", help="run an experiment config into a run directory")
    p.add_argument("config", nargs="?", help="TOML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=5")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument(
        "--force",
        action="store_true",
        help="move an existing run directory aside; with --resume: resume although the model's .py file "
        "changed since the run started",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an unfinished run from its checkpoint")
    p.add_argument(
        "--continue",
        dest="cont",
        action="store_true",
        help="run CONFIG into --out, or resume it there if it is unfinished, or skip it if it finished "
        "(the directory must hold the same config)",
    )
    add_launcher_arguments(p)  # for a comparison: its launcher and [slurm] keys (docs/cluster.md)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``marginlab run``: run a config into a run directory, or resume one (``--resume``).

    Returns the exit status."""
    launcher, table = launcher_settings(args)
    if args.resume:
        if launcher or table:
            raise ConfigError(
                "--resume uses the launcher recorded in the run directory; give no launcher options"
            )
        if args.config or args.overrides:
            raise ConfigError("--resume takes the config from the run directory; give no CONFIG")
        path = resume_experiment(args.resume, force=args.force)  # force: despite an edited model file
    else:
        if not args.config:
            raise ConfigError("give a CONFIG file (e.g. configs/logreg-quick.toml) or --resume RUN_DIR")
        raw = with_launcher(load_config(args.config, args.overrides), launcher, table)
        out = args.out or str(Path("runs") / Path(args.config).stem)
        if args.cont:
            if args.force:
                raise ConfigError(
                    "--continue keeps what the directory holds; it cannot be combined with --force"
                )
            mode = run_or_resume(raw, out)
            print(f"run {'already finished' if mode == 'skip' else 'finished'}: {out}")
            return 0
        path = run_experiment(raw, out, force=args.force)
    print(f"run finished: {path}")
    return 0


def with_launcher(raw: dict[str, Any], launcher: str | None, table: dict[str, Any]) -> dict[str, Any]:
    """A comparison config with the command line's ``--launcher`` and SLURM options applied (they
    override its ``launcher`` and ``[slurm]`` keys); other experiments take none."""
    if launcher is None and not table:
        return raw
    if raw.get("kind") != "compare":
        raise ConfigError("--launcher and the SLURM options are for comparisons and sweeps only")
    return merge_overrides(raw, {**({"launcher": launcher} if launcher else {}), "slurm": table})
