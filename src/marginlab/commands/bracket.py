"""``marginlab margins --estimators bracket[,mip]``: per point [certified lower, attack upper] (and the exact
margin), written as a table, a summary and a figure (:mod:`marginlab.estimators.bracket` computes).

The table's columns: ``index``, ``label``, ``prediction``, ``crown[<domain>]``, ``best[<domain>]``, ``ratio``
and, with ``mip``, ``mip[<domain>]``, ``mip.status``, ``mip.lower`` (:mod:`marginlab.lab.margins_table`).
The domain is ``bracket.domain`` if given, else ``--domain``, else ``box``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from marginlab.base.errors import ConfigError
from marginlab.base.fsio import atomic_write_json
from marginlab.bounds.domain import parse_domain
from marginlab.commands.args import load_from_args, parse_options
from marginlab.core.norms import Norm
from marginlab.core.predict import predict_labels
from marginlab.estimators.bracket import PARAMS, compute_bracket, summary
from marginlab.lab.margins_table import extra_column, margin_column, table_path, write_table
from marginlab.lab.names import BRACKET_FIGURE, MARGINS_SUMMARY
from marginlab.lab.outputs import written_by
from marginlab.plots.bracket import plot_bracket


def _params(items: list[str], domain: str | None = None) -> dict[str, Any]:
    """``--param bracket.KEY=VALUE`` items -> keyword arguments of :func:`compute_bracket`, checked;
    ``domain`` (``--domain``) unless ``bracket.domain`` is given, ``box`` when neither is."""
    out: dict[str, Any] = {}
    for key, value in parse_options(items).items():
        est, _, name = key.partition(".")
        if est != "bracket" or name not in PARAMS:
            raise ConfigError(
                f"--param {key!r}: with bracket use bracket.KEY=VALUE, KEY one of {', '.join(PARAMS)}"
            )
        out[name] = value
    if "attacks" in out:
        a = out["attacks"]
        out["attacks"] = tuple(a.split(",")) if isinstance(a, str) else tuple(a)
    out["domain"] = parse_domain(out.get("domain", domain or "box"))
    for name, kind in (("time_limit", float), ("rtol", float), ("crown_budget", int)):
        if name in out:
            value = out[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"bracket.{name} must be a positive number, got {value!r}")
            out[name] = kind(value)
    return out


def bracket_main(args: argparse.Namespace, names: list[str], out: Path, norm: Norm) -> int:
    """``marginlab margins --estimators bracket[,mip] --out DIR``: table, summary JSON and figure."""
    extra = sorted(set(names) - {"bracket", "mip", "crown", "best"})  # crown and best are its two ends
    if extra:
        raise ConfigError(f"--estimators bracket combines with crown, best and mip only, not {extra[0]!r}")
    params = _params(args.param, getattr(args, "domain", None))
    p = norm.p
    loaded = load_from_args(args)
    model, data, index = loaded[0], loaded[1], loaded[2]
    domain = params.pop("domain")
    b = compute_bracket(
        model, data.x, data.y, p=p, domain=domain, exact="mip" in names, batch_size=args.batch_size, **params
    )
    pred = predict_labels(model, data.x, args.batch_size)
    columns: dict[str, list[Any]] = {"index": index.tolist(), "label": data.y.tolist()}
    columns["prediction"] = pred.tolist()
    columns[margin_column("crown", domain)] = b.lower.tolist()
    columns[margin_column("best", domain)] = b.upper.tolist()
    columns["ratio"] = b.ratio.tolist()
    if "mip" in names:
        columns[margin_column("mip", domain)] = b.exact.tolist()
        columns[extra_column("mip", "status")] = list(b.status)
        columns[extra_column("mip", "lower")] = b.exact_lower.tolist()
    table = table_path(out, args.format)
    write_table(table, columns)
    figure = out / BRACKET_FIGURE
    plot_bracket(table, figure, p=p, domain=domain)  # drawn from the table just written
    info = {
        "model": args.model,
        "data": args.data,
        "split": args.split,
        "norm": str(norm),
        "domain": domain,
    }
    info["kinds"] = {"crown": "lower bound", "best": "upper bound", "mip": "exact"}
    if len(loaded) > 3:  # what was loaded (spec, weights, preprocessing), where the loader reports it
        info["loaded_model"] = loaded[3]
    atomic_write_json(out / MARGINS_SUMMARY, {**written_by("margins"), **info, "bracket": summary(b)})
    s = summary(b)
    print(f"bracket ratio best/crown: median {s['ratio_median']}  p90 {s['ratio_p90']}  (n={s['n']})")
    print(f"wrote {table}, {out / MARGINS_SUMMARY} and {figure}")
    return 0
