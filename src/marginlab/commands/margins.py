"""``marginlab margins``: per-point margins of a trained model by several estimators, and their summary.

    marginlab margins --model mnist-mlp --weights model.pt --data mnist \\
        --estimators first-order,deepfool,best --out margins/

writes into the directory ``margins/``: ``margins.csv`` (or ``.parquet`` with ``--format parquet``, which
needs pandas and pyarrow): one row per point with its index in the split, label, prediction, one
signed-margin column per estimator headed ``<estimator>[<domain>]`` and the estimator's extra per-point
columns ``<estimator>.<column>`` (:mod:`marginlab.lab.margins_table`); and ``summary.json``: the domain
asked for and, per estimator, its kind (exact / lower bound / upper bound / estimate, as achieved), its
domain, min, mean, median, quantiles, parameters (settings only, never per-point data) and seconds, plus
what model was loaded. ``--save-arrays`` also writes the estimators' large per-point arrays (e.g. mip's
perturbations) into ``arrays.npz``.

Domain: ``--domain box`` ([0,1]^d) or ``rd`` (R^d) sets every estimator's domain (``--param EST.domain=``
wins for that estimator); estimators that cannot honour it say so in one line. Without ``--domain`` the
domain is ``box`` for every estimator that honours it, and the estimates that only know R^d
(``first-order``, ``sampling``) keep ``rd`` silently; the headers say which.
From Python, on any ``nn.Module`` mapping [N,C,H,W] to logits::

    estimate_margins(model, x, y, ["first-order", "deepfool", "best"], p=2)   # {name: MarginResult}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch

from marginlab.base.errors import ConfigError
from marginlab.base.fsio import atomic_write_json, atomic_write_with
from marginlab.bounds.domain import parse_domain
from marginlab.commands.args import (
    add_model_arguments,
    add_points_arguments,
    check_out_dir,
    load_from_args,
    parse_names,
    parse_options,
    set_threads,
)
from marginlab.commands.bracket import bracket_main
from marginlab.core.norms import Norm
from marginlab.core.predict import predict_labels
from marginlab.estimators import ESTIMATORS, MarginResult, estimate_margins
from marginlab.estimators.base import NORM_ERROR, NORMS, validate_params
from marginlab.estimators.best import with_domain
from marginlab.lab.margins_table import check_format, extra_column, margin_column, table_path, write_table
from marginlab.lab.names import BRACKET_FIGURE, MARGINS_ARRAYS, MARGINS_SUMMARY, MARGINS_TABLE, WEIGHTS
from marginlab.lab.outputs import writing_into, written_by
from marginlab.training.records import MarginSummary, margin_summary

FORMATS = ("csv", "parquet")
EXAMPLE = (
    f"marginlab margins --model mnist-mlp --weights {WEIGHTS} --data mnist "
    "--estimators first-order,ddn,best --out margins/"
)


class EstimatorMargins(MarginSummary):
    """One estimator in the summary: its kind and margin statistics (:class:`MarginSummary`), how many
    margins were not finite (±inf: no adversarial example found), the domain its margins are distances
    in (``box`` or ``rd``), its settings and its wall time."""

    domain: str
    non_finite: int
    seconds: float
    params: dict[str, Any]


class MarginsSummary(TypedDict):
    """``summary.json`` of ``marginlab margins --out DIR``: what was measured (model, weights, data, split,
    number of points, seed, norm, the domain asked for: ``--domain``, ``box`` when not given), the model's
    accuracy on the points, per estimator its :class:`EstimatorMargins`, the sign convention in words,
    and what model was loaded."""

    model: str
    weights: str | None
    data: str
    split: str
    n: int
    seed: int
    norm: str
    domain: str
    accuracy: float
    estimators: dict[str, EstimatorMargins]
    sign: str
    loaded_model: NotRequired[dict[str, Any]]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``margins`` sub-command to the CLI's sub-parsers."""
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
        "--domain",
        help="box ([0,1]^d; the default for every estimator that honours it) or rd (R^d): every "
        "estimator's domain; --param EST.domain=... wins; the column headers say which (e.g. crown[box])",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="EST.KEY=VALUE",
        help="estimator parameter, e.g. --param ddn.steps=200 (repeatable)",
    )
    p.add_argument("--format", default="csv", choices=FORMATS, help="the per-point table's format")
    p.add_argument(
        "--save-arrays",
        action="store_true",
        help=f"also write the estimators' per-point arrays (e.g. mip's perturbations) to {MARGINS_ARRAYS}",
    )
    p.add_argument("--out", required=True, help=f"output directory ({MARGINS_TABLE}.csv, {MARGINS_SUMMARY})")
    p.set_defaults(func=main)


def _parse_params(items: list[str], names: list[str], domain: str | None) -> dict[str, dict[str, Any]]:
    """``["ddn.steps=200"]`` -> ``{"ddn": {"steps": 200}}`` with every estimator's ``domain`` (``--domain``;
    without it ``box`` where honoured), every value checked (type and range) now, before any data is read
    or any estimator runs."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_options(items).items():
        est, dot, param = key.partition(".")
        if not dot or est not in names:
            raise ConfigError(f"--param {key!r} must be EST.KEY=VALUE with EST among {', '.join(names)}")
        out.setdefault(est, {})[param] = value
    out = with_domain(names, out, domain or "box", where_honoured=domain is None)
    return {est: validate_params(est, params) for est, params in out.items()}


def main(args: argparse.Namespace) -> int:
    """Run ``marginlab margins``: write the per-point table and ``summary.json``; print a line per
    estimator. Returns the exit status (0)."""
    out = check_out_dir(args.out)
    check_format(args.format)
    names = parse_names(args.estimators, "estimator")
    norm = Norm.parse(args.norm, NORMS, error=NORM_ERROR)  # what summary.json records: L2 or Linf
    set_threads(args.threads)
    args.domain = None if args.domain is None else parse_domain(args.domain)  # a typo fails here, in one line
    files = [table_path(out, args.format).name, MARGINS_SUMMARY]
    files += [BRACKET_FIGURE] if "bracket" in names else [MARGINS_ARRAYS] if args.save_arrays else []
    if "bracket" not in names:
        for name in names:
            ESTIMATORS.get(name)
        params = _parse_params(args.param, names, args.domain)
    # never over a run's summary.json or into a run directory itself; under its lock inside one
    with writing_into(out, "margins", files, anchor=MARGINS_SUMMARY, legacy=is_legacy_summary):
        if "bracket" in names:  # not an estimator: crown vs best (and mip) per point, with a figure
            return bracket_main(args, names, out, norm)
        return _margins(args, names, out, norm, params)


def is_legacy_summary(raw: dict[str, Any]) -> bool:
    """Whether a ``summary.json`` without ``written_by`` is ``marginlab margins``' own: a run's summary
    has ``kind``; the command's has per-estimator statistics (or, with ``bracket``, the bracket's)."""
    return "kind" not in raw and ("estimators" in raw or "bracket" in raw)


def _margins(
    args: argparse.Namespace, names: list[str], out: Path, norm: Norm, params: dict[str, dict[str, Any]]
) -> int:
    """The estimators' part of :func:`main`, once the inputs are checked and ``out`` is claimed."""
    model, data, index, loaded = load_from_args(args)
    results = estimate_margins(
        model, data.x, data.y, names, p=norm, batch_size=args.batch_size, params=params
    )
    pred = predict_labels(model, data.x, args.batch_size)
    columns: dict[str, list[Any]] = {
        "index": index.tolist(),
        "label": data.y.tolist(),
        "prediction": pred.tolist(),
    }
    for n, r in results.items():
        columns[margin_column(n, r.domain)] = r.values.tolist()
        columns |= {extra_column(n, c): list(v) for c, v in r.columns.items()}
    write_table(table_path(out, args.format), columns)
    summary = _summary(args, norm, results, float((pred == data.y).double().mean()))
    summary["loaded_model"] = loaded  # spec, weights, key mapping, preprocessing
    written = [table_path(out, args.format)]
    if args.save_arrays:
        written.append(_save_arrays(out, index.numpy(), results))
    # the summary last: it says whose the files beside it are (marginlab.lab.outputs)
    atomic_write_json(out / MARGINS_SUMMARY, {**written_by("margins"), **summary})
    written.append(out / MARGINS_SUMMARY)
    for name in names:
        s = summary["estimators"][name]
        label = margin_column(name, s["domain"])
        line = f"{label:16s} {s['kind']:12s} median {s['median']:.4g}  mean {s['mean']:.4g}"
        print(f"{line}  ({s['seconds']:.1f} s)")
    print(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
    return 0


def _save_arrays(out: Path, index: np.ndarray, results: dict[str, MarginResult]) -> Path:
    """Write ``index [N]`` and every result's per-point arrays as ``<estimator>.<array>`` into one ``.npz``
    (atomically; no pickles)."""
    arrays = {"index": index}
    for n, r in results.items():
        arrays |= {extra_column(n, k): np.asarray(v) for k, v in r.arrays.items()}
    path = out / MARGINS_ARRAYS
    atomic_write_with(path, lambda f: np.savez_compressed(f, allow_pickle=False, **arrays))
    return path


def _summary(
    args: argparse.Namespace, norm: Norm, results: dict[str, MarginResult], accuracy: float
) -> MarginsSummary:
    return {
        "model": args.model,
        "weights": args.weights,
        "data": args.data,
        "split": args.split,
        "n": len(next(iter(results.values()))),
        "seed": args.seed,
        "norm": str(norm),
        "domain": args.domain or "box",
        "accuracy": accuracy,
        "estimators": {
            n: {
                **margin_summary(str(r.kind), r.values),
                "domain": r.domain,
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
