"""The ``marginlab`` command: a thin dispatcher over one module per sub-command.

User mistakes (``MarginlabError``, and a path too long for the filesystem wherever it is first touched)
are printed as ``marginlab: error: <one line>`` with exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from marginlab import __version__
from marginlab.base.errors import ConfigError, MarginlabError
from marginlab.base.logs import setup_logging
from marginlab.commands import data, margins, plot, report, robustness, run, status, sweep
from marginlab.lab.provenance import set_command

# Sub-commands, each a module in marginlab.commands with ``register(subparsers)``, in --help order.
COMMANDS = [run, plot, data, report, sweep, status, robustness, margins]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        # a sub-command's parser is "marginlab run": its errors start "marginlab: error: run: ..." like
        # every other user error
        head, _, command = self.prog.partition(" ")
        where = f"{command}: " if command else ""
        self.exit(2, f"{head}: error: {where}{message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``marginlab`` argument parser with every sub-command of :data:`COMMANDS` registered."""
    parser = _Parser(
        prog="marginlab",
        description="marginlab: margins of classifiers and what they mean for adversarial robustness.",
    )
    parser.add_argument("--version", action="version", version=f"marginlab {__version__}")
    _add_noise_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():
        # -q / -v after the sub-command too (`marginlab margins ... -q`); SUPPRESS: not given there, the
        # sub-parser leaves the value set before the sub-command alone
        _add_noise_options(command_parser, default=argparse.SUPPRESS)
    return parser


def _add_noise_options(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` (mutually exclusive) on ``parser``, with ``default``."""
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug messages of marginlab itself"
    )
    noise.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _refuse_empty_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An empty or blank value (``--out ''``, a shell variable that expanded to nothing) is a user error,
    never "not given": commands test ``if args.x:`` and would silently fall back to a default (the
    current directory, ``runs/``, the bundled data...). The one check for every option of every command."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices[args.command]._actions:
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            name = "/".join(action.option_strings) or action.dest
            raise ConfigError(f"{name} is empty; give a value or leave the option out")


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the same clean-up as for Ctrl-C runs (locks released,
    temporary files removed, finished work kept) before the process exits with status 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``marginlab`` command on ``argv`` (default: ``sys.argv[1:]``); returns the exit status
    (0 done, 2 a user error, 130 interrupted, 143 terminated)."""
    parser = build_parser()
    set_command(["marginlab", *(sys.argv[1:] if argv is None else argv)])
    # `run CONFIG --out DIR key=value`: overrides may also follow the options (argparse stops
    # collecting a positional list at the first option, so they come back as leftovers).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(_is_override(e) for e in extra):
            args.overrides.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verbose and args.quiet:  # one before the sub-command, the other after it
        parser.error("argument -q/--quiet: not allowed with argument -v/--verbose")
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _refuse_empty_values(parser, args)
        return int(args.func(args) or 0)
    except MarginlabError as e:
        print(f"marginlab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        # a path given on the command line (or in a config) longer than the filesystem allows: marginlab's
        # own file names are short, so it is the user's, wherever it was first touched
        name = "" if e.filename is None else str(e.filename)
        shown = name if len(name) <= 60 else f"{name[:60]}... ({len(name)} characters)"
        print(f"marginlab: error: path too long for the filesystem: {shown!r}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `marginlab data | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Terminated:
        print("marginlab: terminated (SIGTERM); finished work is kept, --resume continues", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("marginlab: interrupted; finished work is kept, --resume continues", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
