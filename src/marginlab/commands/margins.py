"""``marginlab margins``: per-point margins of a trained model by several estimators, and their summary.

    marginlab margins --model mnist-mlp --weights model.pt --data mnist \\
        --estimators first-order,deepfool,best --out margins/

writes into the directory ``margins/``: ``margins.csv`` (or ``.parquet`` with ``--format parquet``, which
needs pandas and pyarrow): one row per point with its index in the split, label, prediction and one
signed-margin column per estimator; and ``summary.json``: per estimator its kind (exact / lower bound /
upper bound / estimate), min, mean, median, quantiles, parameters and seconds, plus what model was loaded.
From Python, on any ``nn.Module`` mapping [N,C,H,W] to logits::

    estimate_margins(model, x, y, ["first-order", "deepfool", "best"], p=2)   # {name: MarginResult}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from marginlab.commands.args import (
    add_model_arguments,
    add_points_arguments,
    check_out_dir,
    load_from_args,
    parse_names,
    parse_options,
    set_threads,
)
from marginlab.errors import ConfigError

FORMATS = ("csv", "parquet")
EXAMPLE = (
    "marginlab margins --model mnist-mlp --weights model.pt --data mnist "
    "--estimators first-order,ddn,best --out margins/"
)


def register(sub: argparse._SubParsersAction) -> None:
    from marginlab.estimators import ESTIMATORS

    p = sub.add_parser(
        "margins",
        help="per-point margins of a trained model (several estimators, each with its kind)",
        description="Per-point signed margins by each estimator named, with what kind of number each is "
        f"(exact, lower bound, upper bound, estimate). Example: {EXAMPLE}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p)
    add_points_arguments(p)
    p.add_argument(
        "--estimators",
        "--estimator",
        dest="estimators",
        required=True,
        help=f"comma-separated, from: {', '.join(ESTIMATORS.names())}, and bracket (crown vs best, with "
        "mip for exact values)",
    )
    p.add_argument("--norm", "--p", dest="norm", default="L2", help="L2 or Linf (2 and inf accepted)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="EST.KEY=VALUE",
        help="estimator parameter, e.g. --param ddn.steps=200 (repeatable)",
    )
    p.add_argument("--format", default="csv", choices=FORMATS, help="the per-point table's format")
    p.add_argument("--out", required=True, help="output directory (margins.csv, summary.json)")
    p.set_defaults(func=main)


def table_path(out: Path, fmt: str) -> Path:
    from marginlab.runs import MARGINS_TABLE

    return out / f"{MARGINS_TABLE}.{fmt}"


def check_format(fmt: str) -> None:
    if fmt == "parquet":
        try:
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--format parquet needs pandas and pyarrow; install them or use csv") from None


def _parse_params(items: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    """``["ddn.steps=200"]`` -> ``{"ddn": {"steps": 200}}``, every value checked (type and range) now,
    before any data is read or any estimator runs."""
    from marginlab.estimators.base import validate_params

    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_options(items).items():
        est, dot, param = key.partition(".")
        if not dot or est not in names:
            raise ConfigError(f"--param {key!r} must be EST.KEY=VALUE with EST among {', '.join(names)}")
        out.setdefault(est, {})[param] = value
    return {est: validate_params(est, params) for est, params in out.items()}


def main(args: argparse.Namespace) -> int:
    from marginlab.estimators import ESTIMATORS, estimate_margins, norm_order
    from marginlab.fsio import atomic_write_json
    from marginlab.runs import MARGINS_SUMMARY

    out = check_out_dir(args.out)
    check_format(args.format)
    names = parse_names(args.estimators, "estimator")
    p = norm_order(args.norm)
    set_threads(args.threads)
    if "bracket" in names:  # not an estimator: crown vs best (and mip) per point, with a figure
        from marginlab.bracket import bracket_main

        return bracket_main(args, names, out, p)
    for name in names:
        ESTIMATORS.get(name)
    params = _parse_params(args.param, names)
    model, data, index, loaded = load_from_args(args)
    results = estimate_margins(model, data.x, data.y, names, p=p, batch_size=args.batch_size, params=params)
    with torch.no_grad():
        pred = torch.cat([model(xb) for xb in data.x.split(args.batch_size)]).argmax(1)
    columns = {"index": index.tolist(), "label": data.y.tolist(), "prediction": pred.tolist()}
    columns |= {n: r.values.tolist() for n, r in results.items()}
    write_table(table_path(out, args.format), columns)
    summary = _summary(args, results, float((pred == data.y).double().mean()))
    summary["loaded_model"] = loaded  # spec, weights, key mapping, preprocessing
    atomic_write_json(out / MARGINS_SUMMARY, summary)
    for name in names:
        s = summary["estimators"][name]
        line = f"{name:12s} {s['kind']:12s} median {s['median']:.4g}  mean {s['mean']:.4g}"
        print(f"{line}  ({s['seconds']:.1f} s)")
    print(f"wrote {table_path(out, args.format)} and {out / MARGINS_SUMMARY}")
    return 0


def _summary(args: argparse.Namespace, results: dict[str, Any], accuracy: float) -> dict[str, Any]:
    from marginlab.tracking import margin_stats

    return {
        "model": args.model,
        "weights": args.weights,
        "data": args.data,
        "split": args.split,
        "n": len(next(iter(results.values()))),
        "seed": args.seed,
        "norm": str(args.norm),
        "accuracy": accuracy,
        "estimators": {
            n: {
                "kind": str(r.kind),
                **margin_stats(r.values),
                "non_finite": int((~torch.isfinite(r.values)).sum()),
                "seconds": r.seconds,
                "params": r.params,
            }
            for n, r in results.items()
        },
        "sign": "margins are positive for correctly classified points, negative otherwise; an attack "
        "that found no adversarial example gives +inf (-inf for a misclassified point), counted in "
        "non_finite (JSON writes them as null)",
    }


def write_table(out: Path, columns: dict[str, list[Any]]) -> None:
    """Write the columns as CSV or Parquet, atomically (non-finite margins are written as inf / -inf)."""
    from marginlab.fsio import atomic_write_text, atomic_write_with

    if out.suffix.lower() == ".parquet":
        import pandas as pd

        frame = pd.DataFrame(columns)
        atomic_write_with(out, lambda f: frame.to_parquet(f, index=False))
        return
    from marginlab.report.tables import csv_text

    rows = list(zip(*columns.values(), strict=True))
    atomic_write_text(out, csv_text(list(columns), [[_cell(v) for v in row] for row in rows]))


def _cell(v: Any) -> Any:
    return repr(v) if isinstance(v, float) else v
