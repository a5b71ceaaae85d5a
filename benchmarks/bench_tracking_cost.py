"""What does margin tracking cost beside training? (a benchmark, not a test: it reads finished runs)

For each run directory (a ``train`` run, or a comparison: every sub-run in it) it sums the ``time``
entries of ``metrics.jsonl`` and prints the training seconds, the first-order tracking seconds and the
tracked bound's seconds (``tracking.bound``), each as a share of the training time. Records written
before ``bound_s`` existed give the bound's time as what a bounded epoch's tracking took beyond the
median tracked epoch without the bound.

    python benchmarks/bench_tracking_cost.py runs/compare-medium runs/mnist-mlp-quick
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from marginlab.base.fsio import read_jsonl
from marginlab.lab.runs import METRICS


def cost(records: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of training, of tracking without the bound, and of the bound, over every record."""
    bounded = [r for r in records if any(_has_bound(r, split) for split in ("train", "test"))]
    plain = [r["time"]["track_s"] for r in records if r.get("train") and r not in bounded]
    typical = statistics.median(plain) if plain else 0.0
    train = sum(r["time"]["train_s"] for r in records)
    track = sum(r["time"]["track_s"] for r in records if r.get("train"))
    bound = sum(r["time"].get("bound_s", max(r["time"]["track_s"] - typical, 0.0)) for r in bounded)
    return {"train_s": train, "track_s": track - bound, "bound_s": bound, "epochs": len(records) - 1}


def _has_bound(record: dict[str, Any], split: str) -> bool:
    margins = record.get(split, {}).get("margins", {})
    return any(m.get("kind") in ("upper bound", "lower bound") for m in margins.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (comparisons: every sub-run)")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        for path in sorted(run.rglob(METRICS)):
            c = cost(read_jsonl(path))
            rows.append((str(path.parent), c))
    print(f"{'run':60s} {'epochs':>6s} {'train s':>9s} {'tracking':>9s} {'bound':>7s}")
    for name, c in rows:
        train = c["train_s"] or float("nan")
        print(
            f"{name[-60:]:60s} {c['epochs']:6.0f} {c['train_s']:9.0f} "
            f"{c['track_s'] / train:8.1%} {c['bound_s'] / train:7.1%}"
        )
    if len(rows) > 1:
        tracking = statistics.median(c["track_s"] / c["train_s"] for _, c in rows if c["train_s"])
        bound = statistics.median(c["bound_s"] / c["train_s"] for _, c in rows if c["train_s"])
        print(f"median share of training time: tracking {tracking:.1%}, bound {bound:.1%}")


if __name__ == "__main__":
    main()
