"""Argument parsing shared by the commands: comma-separated lists, radii, norms, point indices.

One parser per kind of value, so that every command accepts the same spellings (``--norm 2`` and
``--norm L2``, ``--eps 0.5,1``, ``--indices 3,17`` or ``--indices FILE``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from marginlab.base.config import INT_LIMIT, from_dict, parse_key_values
from marginlab.base.errors import ConfigError
from marginlab.base.seed import check_seed, usable_threads
from marginlab.data import load_points
from marginlab.lab.launchers import SlurmConfig, check_launcher
from marginlab.nets.loading import load_model
from marginlab.nets.preprocess import parse_preprocess
from marginlab.nets.spec import resolve_spec
from marginlab.nets.weights import parse_key_map

DEFAULT_N = 500


def parse_names(text: str, what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (duplicates dropped, order kept); empty lists are an error."""
    names = list(dict.fromkeys(s.strip() for s in str(text).split(",") if s.strip()))
    if not names:
        raise ConfigError(f"give at least one {what} (a comma-separated list)")
    return names


def _short(text: str, n: int = 40) -> str:
    """``text`` cut to ``n`` characters for an error line (a 5,000-digit index or path stays readable)."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def parse_indices(text: str) -> list[int]:
    """``"3,17,42"`` or a file of integers (one per line, or separated by commas / spaces); no integer
    at all (``""``, ``",,"``) and integers beyond 64 bits are one-line errors."""
    path = Path(text)
    # os.path.isfile, not Path.is_file: a long list "0,1,...,199" is no file name, and Path.is_file
    # would raise ENAMETOOLONG on it
    if os.path.isfile(text):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read indices from {path} ({type(e).__name__})") from None
    out = []
    for item in text.replace(",", " ").split():
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(
                f"bad index {_short(item)!r}: give integers, e.g. --indices 3,17,42 or a file"
            ) from None
        if not -INT_LIMIT < value < INT_LIMIT:  # torch would overflow converting it, deep inside
            raise ConfigError(f"index {_short(item)} is out of range (indices must fit in 64 bits)")
        out.append(value)
    if not out:
        raise ConfigError("--indices names no point")
    return out


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that name a model, its weights and the points to evaluate (shared with ``margins``)."""
    p.add_argument(
        "--model",
        required=True,
        help="a registry name (marginlab.nets.models.MODELS), FILE.py:Class, package.module:factory, "
        "a TorchScript file or an .onnx file (needs marginlab[onnx])",
    )
    p.add_argument(
        "--weights",
        help="a state_dict or checkpoint file (needed for registry models; TorchScript/ONNX hold their own)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option, e.g. --option widths=[256] (repeatable)",
    )
    p.add_argument(
        "--preprocess",
        metavar="mean=M,std=S",
        help="input normalisation folded into the model, e.g. mean=0.1307,std=0.3081 or "
        "mean=0.49,0.48,0.45,std=0.25,0.24,0.26 (attacks and eps stay in [0,1] pixels)",
    )
    p.add_argument(
        "--key-map",
        metavar="OLD=NEW,...",
        help="rename checkpoint key prefixes, e.g. features.=phi.,fc3.=head. (foreign names that pair "
        "up in order with the model's are mapped without it)",
    )


def add_points_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose the points to evaluate and how (shared by ``margins`` and ``robustness``)."""
    p.add_argument(
        "--data", required=True, help="dataset spec: mnist, fashion-mnist, cifar10, digits, mnist:0,1"
    )
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split (default test)")
    p.add_argument(
        "--n",
        type=int_arg,
        help=f"points drawn from the split with --seed (default {DEFAULT_N}, or all if fewer)",
    )
    p.add_argument("--all", action="store_true", help="use every point of the split (ignores --n)")
    p.add_argument(
        "--indices",
        help="exactly these points of the split: 3,17,42 or a file of integers (instead of --n/--seed); "
        "the indices used are always written with the results",
    )
    p.add_argument(
        "--seed", type=seed_arg, default=0, help="seed of the point subset and the attacks (default 0)"
    )
    p.add_argument("--data-dir", help="data directory (default: $MARGINLAB_DATA or ~/.marginlab/data)")
    p.add_argument("--batch-size", type=int_arg, default=256, help="points per batch")
    p.add_argument("--threads", type=int_arg, help="CPU threads for torch (default: torch's choice)")


def int_arg(text: str) -> int:
    """argparse type: an integer that fits in 64 bits (torch overflows on larger ones, deep inside)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -INT_LIMIT < value < INT_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is out of range (integers must lie within +-(2**63 - 1))")
    return value


def seed_arg(text: str) -> int:
    """argparse type: a seed (see :func:`marginlab.base.seed.check_seed`)."""
    try:
        return check_seed(int_arg(text), "the seed")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["widths=[256]", "dropout=0.5"]`` -> ``{"widths": [256], "dropout": 0.5}`` (values as TOML;
    :func:`marginlab.base.config.parse_key_values`)."""
    return parse_key_values(items, "option", "KEY=VALUE")


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(model, dataset, index, record)`` from the options of :func:`add_model_arguments`; ``record``
    says what was loaded (:func:`marginlab.nets.loading.load_model`). User errors: one line."""
    # every cheap check first: a bad spec, option or file fails before any data is read
    resolve_spec(args.model)
    preprocess = parse_preprocess(args.preprocess)
    key_map = parse_key_map(args.key_map)
    options = parse_options(args.option)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise ConfigError(f"weights file {args.weights} not found")
    n = None if args.all else DEFAULT_N if args.n is None else args.n
    indices = parse_indices(args.indices) if args.indices is not None else None  # '' names no point
    if indices is not None and (args.n is not None or args.all):
        raise ConfigError("--indices chooses the points itself; give no --n or --all with it")
    data, index = load_points(
        args.data, args.split, n=n, seed=args.seed, indices=indices, data_dir=args.data_dir,
        clip=args.n is None,
    )  # fmt: skip
    loaded = load_model(
        args.model,
        args.weights,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        options=options,
        preprocess=preprocess,
        key_map=key_map,
    )
    return loaded.model, data, index, loaded.record


# Room left under PATH_MAX for what the commands write inside ``--out`` (``figures/.NAME.png.XXXX.tmp``).
_INSIDE = 64


def _path_limit(path: Path, name: str, default: int) -> int:
    """``os.pathconf`` of the nearest existing ancestor of ``path`` (``name``: PC_NAME_MAX, PC_PATH_MAX)."""
    anchor = path.absolute()
    # os.path.isdir, not Path.exists: that raises ENAMETOOLONG on the very paths checked here
    while not os.path.isdir(anchor) and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        return int(os.pathconf(anchor, name))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no limit: POSIX's usual
        return default


def check_path_length(path: Path, what: str) -> None:
    """Refuse a ``path`` the filesystem cannot hold, in one line naming the limit: a name of more than
    NAME_MAX bytes (255 on most filesystems) or a path (with room for the files written inside it)
    of PATH_MAX bytes (4096 on Linux) or more. Checked when the arguments are parsed, so that the
    error comes before any work, not as ``OSError: [Errno 36]`` when the results are written."""
    name_max = _path_limit(path, "PC_NAME_MAX", 255)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ConfigError(
                f"{what}: the name {_short(part)!r} is {size} bytes; the filesystem allows {name_max} "
                "(NAME_MAX)"
            )
    path_max = _path_limit(path, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(path.absolute()))
    if size + _INSIDE >= path_max:
        raise ConfigError(
            f"{what} {_short(str(path))!r}: the path is {size} bytes; with the files written inside it "
            f"it must stay under {path_max - _INSIDE} (PATH_MAX {path_max})"
        )


def check_out_dir(text: str) -> Path:
    """``--out``: a directory (made when the results are written); refuse an existing file and a path
    too long for the filesystem (:func:`check_path_length`)."""
    out = Path(text)
    check_path_length(out, "--out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    return out


def set_threads(threads: int | None) -> None:
    """``--threads``: how many CPU threads torch may use (``None``: leave torch's default). More than the
    machine's cores are clamped to them with a warning (:func:`marginlab.base.seed.usable_threads`):
    torch would otherwise crash starting them."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(usable_threads(threads, "--threads"))


_SLURM_FLAGS = ("partition", "time", "gpus_per_task", "cpus_per_task", "mem", "array_parallelism", "poll_s")


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    """``--launcher local|slurm`` and the SLURM options (shared by ``sweep`` and ``run`` of a comparison)."""
    g = p.add_argument_group("launcher", "where the runs execute: here, or on SLURM (see the docs: cluster)")
    g.add_argument(
        "--launcher",
        metavar="local|slurm",
        help="local worker processes (the default) or one SLURM array job, a task per run (submitit)",
    )
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--time", type=int_arg, metavar="MINUTES", help="time limit of each run (default 60)")
    g.add_argument("--gpus-per-task", type=int_arg, metavar="N", help="GPUs of each run (default 0)")
    g.add_argument("--cpus-per-task", type=int_arg, metavar="N", help="CPUs of each run's process")
    g.add_argument("--mem", metavar="SIZE", help="memory of each run, e.g. 8G")
    g.add_argument("--array-parallelism", type=int_arg, metavar="N", help="runs at once at most")
    g.add_argument(
        "--slurm-poll",
        type=float,
        dest="poll_s",
        metavar="SECONDS",
        help="seconds between looks at squeue (5)",
    )
    g.add_argument(
        "--slurm-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --slurm-param qos=high (repeatable)",
    )


def launcher_settings(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """``(launcher, slurm table)`` from the options of :func:`add_launcher_arguments`: the launcher named
    (``None``: not given) and the ``[slurm]`` keys given; SLURM options without ``--launcher slurm`` (or
    a bad value) are a one-line :class:`ConfigError`."""
    launcher = None if args.launcher is None else check_launcher(args.launcher)
    table: dict[str, Any] = {k: getattr(args, k) for k in _SLURM_FLAGS if getattr(args, k) is not None}
    if args.slurm_param:
        table["params"] = parse_key_values(args.slurm_param, "slurm-param", "KEY=VALUE")
    if table and launcher == "local":
        flags = ", ".join(
            "--" + {"poll_s": "slurm-poll", "params": "slurm-param"}.get(k, k).replace("_", "-")
            for k in table
        )
        raise ConfigError(f"{flags} only apply to --launcher slurm")
    from_dict(SlurmConfig, table, "slurm")  # every value checked now, one line each
    return launcher, table
