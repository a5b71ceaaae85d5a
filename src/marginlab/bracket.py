"""Margin brackets: per point, a certified lower bound (``crown``), the best attack's upper bound (``best``)
and, where requested and solved, the exact margin (``mip``), all in one domain.

    marginlab margins --model mnist-mlp --weights model.pt --data mnist --estimators bracket --out b/
    marginlab margins ... --estimators bracket,mip --param bracket.time_limit=30 --out b/

writes into ``b/``: ``margins.csv`` (index, label, prediction, crown, best, ratio, and with ``mip`` the
exact margin, its status and SCIP's lower end), ``summary.json`` (median and 90th-percentile ``ratio``,
times) and the figure ``bracket.png``. ``ratio = |best| / |crown| >= 1`` measures how well the margin
is known: the true margin lies within that factor of either end. Points whose lower bound is 0 (or
whose attack failed) have an infinite ratio; they are counted, and the quantiles are taken over every point.

Domain: ``bracket.domain`` (``box``, default, or ``rd``) applies to ``crown`` and ``mip``; the attacks
search inside the box, so their bounds hold in both domains.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marginlab.errors import ConfigError

PARAMS = ("domain", "attacks", "time_limit", "rtol", "crown_budget")


@dataclass
class Bracket:
    """Per point ``[N]`` (float64): signed ``lower`` (crown), ``upper`` (best), ``exact`` (NaN where not
    asked or not solved), ``exact_lower`` (the mip's own lower end) and ``status`` (mip's, or "")."""

    lower: torch.Tensor
    upper: torch.Tensor
    exact: torch.Tensor
    status: list[str]
    exact_lower: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> torch.Tensor:
        """``|upper| / |lower|`` ``[N]`` (``inf`` where the lower bound is 0 or the attack failed)."""
        lo, up = self.lower.abs(), self.upper.abs()
        return torch.where(lo > 0, up / lo, torch.full_like(up, math.inf))


def compute_bracket(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    p: float,
    domain: str = "box",
    attacks: tuple[str, ...] | None = None,
    exact: bool = False,
    time_limit: float = 60.0,
    rtol: float = 1e-3,
    crown_budget: int = 1 << 22,
    batch_size: int = 64,
) -> Bracket:
    """Brackets of ``x [N,C,H,W]``, ``y [N]``: crown, best (``attacks``, default DeepFool+DDN for L2,
    DeepFool+FMN for L-inf) and, with ``exact``, the mip estimator with ``time_limit`` s per point."""
    from marginlab.estimators import build_estimator, combine_upper_bounds

    if attacks is None:
        attacks = ("deepfool", "ddn") if p == 2.0 else ("deepfool", "fmn")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    crown = build_estimator(
        "crown", domain=domain, rtol=rtol, crown_budget=crown_budget, batch_size=batch_size
    )
    lower = crown(model, x, y, p=p)
    seconds["crown"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    upper = combine_upper_bounds(
        [build_estimator(a, batch_size=batch_size)(model, x, y, p=p) for a in attacks]
    )
    seconds["best"] = time.perf_counter() - t0
    nan = torch.full_like(lower, math.nan)
    if not exact:
        return Bracket(lower, upper, nan, ["" for _ in range(len(x))], nan.clone(), seconds)
    t0 = time.perf_counter()
    mip = build_estimator("mip", domain=domain, time_limit=time_limit, batch_size=batch_size)
    values = mip(model, x, y, p=p)
    seconds["mip"] = time.perf_counter() - t0
    status = [r.status for r in mip.last_details]
    solved = torch.tensor([s == "exact" for s in status])
    sign = torch.sign(values)
    lows = torch.tensor([r.lower for r in mip.last_details], dtype=torch.float64) * sign
    return Bracket(lower, upper, torch.where(solved, values, nan), status, lows, seconds)


def summary(b: Bracket) -> dict[str, Any]:
    """Median / 90th-percentile ratio and counts (JSON-ready; ``inf`` becomes ``None``)."""
    ratio = b.ratio
    big = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, 1e300))
    q = [float(v) for v in torch.quantile(big, torch.tensor([0.5, 0.9], dtype=torch.float64))]
    out: dict[str, Any] = {
        "n": len(ratio),
        "ratio_median": q[0] if q[0] < 1e299 else None,
        "ratio_p90": q[1] if q[1] < 1e299 else None,
        "ratio_infinite": int((~torch.isfinite(ratio)).sum()),
        "lower_median": float(b.lower.abs().median()),
        "upper_median": float(b.upper.abs().median()),
        "seconds": b.seconds,
    }
    if any(b.status):
        solved = ~torch.isnan(b.exact)
        out["exact_solved"] = int(solved.sum())
        if solved.any():
            ex = b.exact[solved].abs()
            out["exact_median"] = float(ex.median())
            out["upper_over_exact_median"] = float((b.upper[solved].abs() / ex).median())
            out["exact_over_lower_median"] = float((ex / b.lower[solved].abs()).median())
    return out


def plot(b: Bracket, path: str | Path, *, p: float, domain: str) -> Path:
    """Sorted points (by the upper bound) with the band [lower, upper] and the exact margins as dots."""
    from marginlab.plots.common import new_figure, save

    order = torch.argsort(b.upper.abs())
    lo, up, ex = (t.abs()[order].numpy() for t in (b.lower, b.upper, b.exact))
    idx = range(len(lo))
    fig, ax = new_figure(size=(5.5, 3.4))
    ax.fill_between(idx, lo, up, color="tab:blue", alpha=0.2, step="mid", label="bracket")
    ax.plot(idx, up, color="tab:red", lw=1, drawstyle="steps-mid", label="upper bound (best attack)")
    ax.plot(idx, lo, color="tab:green", lw=1, drawstyle="steps-mid", label="certified lower bound (crown)")
    if not all(math.isnan(v) for v in ex):
        ax.plot(idx, ex, "k.", ms=3, label="exact (mip)")
    norm = "L2" if p == 2.0 else "L∞"
    where = "$[0,1]^d$" if domain == "box" else "$\\mathbb{R}^d$"
    ax.set_xlabel("points, sorted by the upper bound")
    ax.set_ylabel(f"{norm} margin over {where}")
    ax.legend(loc="upper left")
    return save(fig, path)


def _params(items: list[str]) -> dict[str, Any]:
    """``--param bracket.KEY=VALUE`` items -> keyword arguments of :func:`compute_bracket`, checked."""
    from marginlab.bounds import parse_domain
    from marginlab.commands.args import parse_options

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
    out["domain"] = parse_domain(out.get("domain", "box"))
    for name, kind in (("time_limit", float), ("rtol", float), ("crown_budget", int)):
        if name in out:
            value = out[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"bracket.{name} must be a positive number, got {value!r}")
            out[name] = kind(value)
    return out


def bracket_main(args: argparse.Namespace, names: list[str], out: Path, p: float) -> int:
    """``marginlab margins --estimators bracket[,mip] --out DIR``: table, summary JSON and figure."""
    from marginlab.commands.args import load_from_args
    from marginlab.commands.margins import table_path, write_table
    from marginlab.fsio import atomic_write_json
    from marginlab.runs import BRACKET_FIGURE, MARGINS_SUMMARY

    extra = sorted(set(names) - {"bracket", "mip", "crown", "best"})  # crown and best are its two ends
    if extra:
        raise ConfigError(f"--estimators bracket combines with crown, best and mip only, not {extra[0]!r}")
    params = _params(args.param)
    loaded = load_from_args(args)
    model, data, index = loaded[0], loaded[1], loaded[2]
    domain = params.pop("domain")
    b = compute_bracket(
        model, data.x, data.y, p=p, domain=domain, exact="mip" in names, batch_size=args.batch_size, **params
    )
    with torch.no_grad():
        pred = torch.cat([model(xb) for xb in data.x.split(args.batch_size)]).argmax(1)
    columns: dict[str, list[Any]] = {"index": index.tolist(), "label": data.y.tolist()}
    columns |= {"prediction": pred.tolist(), "crown": b.lower.tolist(), "best": b.upper.tolist()}
    columns["ratio"] = b.ratio.tolist()
    if "mip" in names:
        columns |= {"mip": b.exact.tolist(), "mip_status": b.status, "mip_lower": b.exact_lower.tolist()}
    write_table(table_path(out, args.format), columns)
    figure = out / BRACKET_FIGURE
    plot(b, figure, p=p, domain=domain)
    info = {
        "model": args.model,
        "data": args.data,
        "split": args.split,
        "norm": str(args.norm),
        "domain": domain,
    }
    info["kinds"] = {"crown": "lower bound", "best": "upper bound", "mip": "exact"}
    if len(loaded) > 3:  # what was loaded (spec, weights, preprocessing), where the loader reports it
        info["loaded_model"] = loaded[3]
    atomic_write_json(out / MARGINS_SUMMARY, {**info, "bracket": summary(b)})
    s = summary(b)
    print(f"bracket ratio best/crown: median {s['ratio_median']}  p90 {s['ratio_p90']}  (n={s['n']})")
    print(f"wrote {table_path(out, args.format)}, {out / MARGINS_SUMMARY} and {figure}")
    return 0
