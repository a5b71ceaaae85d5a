"""``marginlab margins``: per-point margins of a trained model by several estimators, and their summary.

    marginlab margins --model mnist-mlp --weights model.pt --data mnist \\
        --estimator first-order,deepfool,best --out margins.csv

writes ``margins.csv`` (or ``.parquet``, which needs pandas and pyarrow): one row per point with its
index in the split, label, prediction and one signed-margin column per estimator; and beside it
``margins.summary.json``: per estimator its kind (exact / lower bound / upper bound / estimate), min,
mean, median, quantiles and seconds. From Python, on any ``nn.Module`` mapping [N,C,H,W] to logits::

    estimate_margins(model, x, y, ["first-order", "deepfool", "best"], p=2)   # {name: [N] float64}
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from marginlab.commands.robustness import add_model_arguments, load_from_args
from marginlab.errors import ConfigError

FORMATS = (".csv", ".parquet")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("margins", help="per-point margins of a trained model (several estimators)")
    add_model_arguments(p)
    p.add_argument("--estimator", required=True, help="comma-separated, e.g. first-order,deepfool,best")
    p.add_argument("--p", default="2", help="norm of the perturbation: 2 or inf (default 2)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="EST.KEY=VALUE",
        help="estimator parameter, e.g. --param ddn.steps=200 (repeatable)",
    )
    p.add_argument("--out", required=True, help="output file, .csv or .parquet (a .summary.json goes beside)")
    p.set_defaults(func=main)


def summary_path(out: Path) -> Path:
    """``margins.csv`` -> ``margins.summary.json``."""
    return out.with_name(out.stem + ".summary.json")


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out must end in .csv or .parquet, got {out.name!r}")
    if out.suffix.lower() == ".parquet":
        try:
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                "writing .parquet needs pandas and pyarrow; install them or use a .csv file"
            ) from None
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name ending in .csv or .parquet")


def _parse_params(items: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    """``["ddn.steps=200"]`` -> ``{"ddn": {"steps": 200}}``, every value checked (type and range) now,
    before any data is read or any estimator runs."""
    from marginlab.commands.robustness import parse_options
    from marginlab.estimators.base import validate_params

    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_options(items).items():
        est, dot, param = key.partition(".")
        if not dot or est not in names:
            raise ConfigError(f"--param {key!r} must be EST.KEY=VALUE with EST among {', '.join(names)}")
        out.setdefault(est, {})[param] = value
    return {est: validate_params(est, params) for est, params in out.items()}


def timed_margins(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: list[str],
    *,
    p: float | str,
    batch_size: int,
    params: dict[str, dict[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Margins ``{name: [N]}`` and seconds per estimator; ``best`` reuses the attacks named beside it and
    is charged the time of every attack it combines."""
    from marginlab.estimators import (
        ESTIMATORS,
        MarginKind,
        build_estimator,
        combine_upper_bounds,
        estimate_margins,
    )
    from marginlab.estimators.best import DEFAULT_BEST

    def is_attack(name: str) -> bool:
        return name != "best" and ESTIMATORS.get(name).kind is MarginKind.UPPER

    values: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}

    def run(name: str) -> None:
        if name not in values:
            t0 = time.perf_counter()
            kw = {name: params[name]} if name in params else None
            values[name] = estimate_margins(model, x, y, [name], p=p, batch_size=batch_size, params=kw)[name]
            seconds[name] = time.perf_counter() - t0

    for name in names:
        if name != "best":
            run(name)
    if "best" in names:
        best = dict(params.get("best", {}))
        attacks = list(best.pop("attacks", None) or [n for n in names if is_attack(n)] or DEFAULT_BEST)
        build_estimator("best", attacks=tuple(attacks))  # validates the names
        for a in attacks:
            run(a)
        values["best"] = combine_upper_bounds([values[a] for a in attacks])
        seconds["best"] = sum(seconds[a] for a in attacks)
    return {n: values[n] for n in names}, {n: seconds[n] for n in names}


def main(args: argparse.Namespace) -> int:
    from marginlab.estimators import ESTIMATORS, norm_order
    from marginlab.evaluation import parse_names

    out = Path(args.out)
    _check_out(out)
    names = parse_names(args.estimator, "estimator")
    if "bracket" in names:  # not an estimator: crown vs best (and mip) per point, with a figure
        from marginlab.bracket import bracket_main

        return bracket_main(args, names)
    for name in names:
        ESTIMATORS.get(name)
    p = norm_order(args.p)
    params = _parse_params(args.param, names)
    model, data, index, loaded = load_from_args(args)
    margins, seconds = timed_margins(
        model, data.x, data.y, names, p=p, batch_size=args.batch_size, params=params
    )
    with torch.no_grad():
        pred = torch.cat([model(xb) for xb in data.x.split(args.batch_size)]).argmax(1)
    columns = {"index": index.tolist(), "label": data.y.tolist(), "prediction": pred.tolist()}
    columns |= {n: m.tolist() for n, m in margins.items()}
    _write_table(out, columns)
    summary = _summary(args, names, margins, seconds, float((pred == data.y).double().mean()))
    summary["loaded_model"] = loaded  # spec, weights, key mapping, preprocessing
    from marginlab.fsio import atomic_write_json

    atomic_write_json(summary_path(out), summary)
    for name in names:
        s = summary["estimators"][name]
        print(
            f"{name:12s} {s['kind']:12s} median {s['median']:.4g}  mean {s['mean']:.4g}"
            f"  ({s['seconds']:.1f} s)"
        )
    print(f"wrote {out} and {summary_path(out)}")
    return 0


def _summary(
    args: argparse.Namespace,
    names: list[str],
    margins: dict[str, torch.Tensor],
    seconds: dict[str, float],
    accuracy: float,
) -> dict[str, Any]:
    from marginlab.estimators import ESTIMATORS
    from marginlab.tracking import margin_stats

    return {
        "model": args.model,
        "weights": args.weights,
        "data": args.data,
        "split": args.split,
        "n": len(next(iter(margins.values()))),
        "seed": args.seed,
        "p": str(args.p),
        "accuracy": accuracy,
        "estimators": {
            n: {
                "kind": str(ESTIMATORS.get(n).kind),
                **margin_stats(margins[n]),
                "non_finite": int((~torch.isfinite(margins[n])).sum()),
                "seconds": seconds[n],
            }
            for n in names
        },
        "sign": "margins are positive for correctly classified points, negative otherwise; an attack "
        "that found no adversarial example gives +inf (-inf for a misclassified point), counted in "
        "non_finite (JSON writes them as null)",
    }


def _write_table(out: Path, columns: dict[str, list[Any]]) -> None:
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
