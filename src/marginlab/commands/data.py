"""``marginlab data``: list the datasets, check where each split is read from, download official files."""

from __future__ import annotations

import argparse

from marginlab.base.errors import ConfigError
from marginlab.data import DATASETS, load_dataset


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` sub-command to the CLI's sub-parsers."""
    p = sub.add_parser(
        "data",
        help="list datasets, check their sources, download official files",
        description="List the datasets (the default), check where each split is read from, or download "
        "the official files. Example: marginlab data check mnist fashion-mnist",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "action", nargs="?", default="list", choices=["list", "check", "download"], help="what to do"
    )
    p.add_argument("datasets", nargs="*", metavar="SPEC", help="dataset specs (all when none is given)")
    p.add_argument("--data-dir", help="data directory (default: $MARGINLAB_DATA or ~/.marginlab/data)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``marginlab data``: list the datasets, check their sources or download official files.

    Returns the exit status."""
    names = args.datasets or DATASETS.names()
    if args.action == "list":
        for name in names:
            info = DATASETS.get(name)
            print(f"{name:14s} {info.shape}  {len(info.classes)} classes  {info.description}")
        return 0
    if args.action == "download" and not args.datasets:
        raise ConfigError("name the datasets to download, e.g. 'marginlab data download mnist'")
    for spec in names:
        for split in ("train", "test"):
            ds = load_dataset(spec, split, data_dir=args.data_dir, download=args.action == "download")
            print(f"{spec} {split}: {len(ds)} images {tuple(ds.x.shape[1:])} from {ds.source}")
    return 0
