"""The side-by-side tables of ``table.md``: per base, every recipe in one row, with its change against
``standard`` and the ablations, from the rows of :func:`marginlab.experiments.compare_results.collect` and
the pairs of a summary (:func:`marginlab.experiments.compare_verdicts.summarize`), so that the tables
show the very numbers the findings state.

Per base three tables: accuracy and training cost (clean, worst-case robust and certified accuracy at the
reference radius; wall and CPU seconds of training and their ratio to ``standard``); the margin
distribution of the fixed test points (min, quartiles, mean of the min-norm bound and of the certified
radius, beside the tracked test mean margin); the ablations. A change cell reads ``+24.0% [+18.0%,
+30.0%] beyond``: the paired difference, its 95% interval over seeds (``±`` 2 s.e. over the test points
with one seed) and whether it is beyond noise.
"""

from __future__ import annotations

from typing import Any

from marginlab.base.tables import format_cell, markdown_table
from marginlab.experiments.compare_pairs import reference, robust_beyond_noise
from marginlab.experiments.compare_results import POINT_STATS, Row, metric_key

QUESTION_COLUMNS = ["ablation", "mean margin", "robust acc", "certified acc", "margin bound mean"]


def side_by_side(base: str, rows: list[Row], entry: dict[str, Any]) -> list[str]:
    """The Markdown sections of one base: ``rows`` are its recipes' rows, ``entry`` its summary entry."""
    ref = rows[0]["eps_ref"]
    vs = entry.get("vs_standard") or {}
    seeds = rows[0].get("seeds", 1)
    out = [
        f"\n## {base}: recipes side by side (eps_ref = {ref:g}, {seeds} seed(s); change vs standard)\n",
        markdown_table(
            [
                "recipe",
                "clean acc",
                "robust acc (worst)",
                "vs standard",
                "certified acc",
                "vs standard",
                "train wall s",
                "x standard",
                "train CPU s",
                "x standard",
            ],
            [_accuracy_line(r, vs.get(r["recipe"])) for r in rows],
        ),  # fmt: skip
        f"\n## {base}: margins of the {rows[0].get('n_points')} fixed test points "
        f"(bound: {rows[0].get('margin_bound') or '–'}; certified: {rows[0].get('certifier') or '–'})\n",
        markdown_table(
            [
                "recipe",
                f"tracked test mean ({rows[0].get('margin_estimator')})",
                "vs standard",
                *[f"bound {k}" for k in POINT_STATS],
                "vs standard",
                *[f"certified {k}" for k in POINT_STATS],
            ],
            [_margin_line(r, vs.get(r["recipe"])) for r in rows],
        ),  # fmt: skip
    ]
    ablations = entry.get("ablations") or {}
    if ablations:
        out += [
            f"\n## {base}: ablations (change of the first recipe over the second)\n",
            markdown_table(QUESTION_COLUMNS, [_ablation_line(k, v) for k, v in ablations.items()]),
        ]
        out += [f"- {k}: {v['question']}" for k, v in ablations.items()]
    return out


def _accuracy_line(row: Row, v: dict[str, Any] | None) -> list[str]:
    ref = row["eps_ref"]
    cost = (v or {}).get("time") or {}
    return [
        row["recipe"],
        percent(row.get("clean_acc")),
        percent(row.get(metric_key("worst", ref))),
        accuracy_change(reference(v["robust_accuracy"])) if v else "",
        percent(row.get(metric_key("certified", ref))),
        accuracy_change(reference(v["certified_accuracy"])) if v and "certified_accuracy" in v else "",
        format_cell(row.get("train_wall_s")),
        ratio_cell(cost.get("wall")) if v else "1",
        format_cell(row.get("train_cpu_s")),
        ratio_cell(cost.get("cpu")) if v else "1",
    ]


def _margin_line(row: Row, v: dict[str, Any] | None) -> list[str]:
    return [
        row["recipe"],
        format_cell(row.get("test_mean_margin")),
        margin_change(v["mean_margin"]) if v else "",
        *[format_cell(row.get(f"upper_{k}")) for k in POINT_STATS],
        point_change(v["point_margin"]) if v and "point_margin" in v else "",
        *[format_cell(row.get(f"lower_{k}")) for k in POINT_STATS],
    ]


def _ablation_line(name: str, v: dict[str, Any]) -> list[str]:
    return [
        name + ("" if v["comparable"] else " (NOT comparable: clean accuracy)"),
        margin_change(v["mean_margin"]),
        accuracy_change(reference(v["robust_accuracy"])),
        accuracy_change(reference(v["certified_accuracy"])) if "certified_accuracy" in v else "",
        point_change(v["point_margin"]) if "point_margin" in v else "",
    ]


def percent(x: object) -> str:
    """An accuracy as a percentage (``–`` when missing)."""
    return f"{x:.1%}" if isinstance(x, int | float) and not isinstance(x, bool) else "–"


def _noise(beyond: bool) -> str:
    return "beyond" if beyond else "within"


def accuracy_change(e: dict[str, Any]) -> str:
    """A change of accuracy: the paired difference, its interval over seeds (or 2 s.e. over points)."""
    seeds = e.get("over_seeds") or {}
    if seeds.get("ci"):
        lo, hi = seeds["ci"]
        return f"{e['delta']:+.1%} [{lo:+.1%}, {hi:+.1%}] {_noise(robust_beyond_noise(e))}"
    return f"{e['delta']:+.1%} ±{e['noise_2se']:.1%} {_noise(robust_beyond_noise(e))}"


def margin_change(mm: dict[str, Any]) -> str:
    """A change of the tracked mean margin: the mean paired difference over seeds and its interval."""
    if mm.get("diff") is None:
        return "–"
    if mm.get("ci") is None:
        return f"{mm['diff']:+.3g} (one seed)"
    lo, hi = mm["ci"]
    return f"{mm['diff']:+.3g} [{lo:+.3g}, {hi:+.3g}] {_noise(mm['beyond_noise'])}"


def point_change(pm: dict[str, Any]) -> str:
    """A change of the mean margin bound of the fixed points: paired over the points (t interval)."""
    pts = pm["over_points"]
    if pm.get("diff") is None:
        return "–"
    if not pts.get("ci"):
        return f"{pm['diff']:+.3g}"
    lo, hi = pts["ci"]
    return f"{pm['diff']:+.3g} [{lo:+.3g}, {hi:+.3g}] {_noise(pts['beyond_noise'])}"


def ratio_cell(c: dict[str, Any] | None) -> str:
    """A cost ratio: ``3.2x [2.9, 3.5]`` (the interval over seeds when there are two or more)."""
    if not c or c.get("ratio") is None:
        return "–"
    if c.get("ci") is None:
        return f"{c['ratio']:.2f}x"
    lo, hi = c["ci"]
    return f"{c['ratio']:.2f}x [{lo:.2f}, {hi:.2f}]"
