"""Does a CNN's mean margin fall after interpolation? (a study script, not a test: it reads finished runs)

Each ``--setting NAME=DIR[,DIR...]`` names one training setting and its run directories, one per seed
(``train`` runs, ideally tracked on the log step grid, ``tracking.every = "log"``). For every margin the
runs track (the first-order estimate, a tracked min-norm bound such as ``ddn``, and the output-space
``normalised_margin``) and each split it prints, over seeds:

- the interpolation step: the first tracked step whose training-subset accuracy is >= 99%
  (marginlab.training.trends.INTERPOLATION_ACC);
- the mean margin there, its peak after it (and the step of the peak), and its value at the last step;
- the change last - peak, last - interpolation and over the last decade of steps (last - the value at a
  tenth of the last step: the late-phase trend), with a paired 95% t interval over seeds
  (marginlab.core.stats.paired_ci), and one sentence: does the mean margin fall after interpolation,
  from which step, by how much;
- the same for the minimum margin (which the theory says keeps rising);
- over the whole run (interpolation aside): the mean margin's highest point at any tracked step, its
  fall from there to the end and the minimum margin's change over the same span, the poster's
  trade-off shape. The peak is chosen after the fact, so last - peak leans toward a fall: read it
  beside ``--from-step N``, a comparison fixed in advance (last - the value at step N);
- tracking's share of the run's time.

With ``--figure PATH`` it draws the mean and min margin (train and test, every seed) against the
optimizer step on a log axis, one row per setting.

    python benchmarks/study_cnn_tradeoff.py --setting "sgd-m0.9 lr0.01=runs/a-seed0,runs/a-seed1" \\
        --figure cnn-tradeoff.png
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from marginlab.core.stats import paired_ci
from marginlab.lab.readers import read_metrics
from marginlab.training.trends import INTERPOLATION_ACC

Curve = tuple[list[int], list[float]]  # steps, values


def curve(records: list[dict[str, Any]], split: str, name: str, stat: str) -> Curve:
    """``(steps, values)`` of one statistic over the tracked records (normalised/logit margins by name)."""
    steps, values = [], []
    for r in records:
        s = r.get(split)
        if not s:
            continue
        st = s.get(name) if name in ("normalised_margin", "logit_margin") else s["margins"].get(name)
        if st is not None and st.get(stat) is not None:
            steps.append(int(r["step"]))
            values.append(float(st[stat]))
    return steps, values


def interpolation_step(records: list[dict[str, Any]]) -> int | None:
    """The first tracked step whose training-subset accuracy reaches INTERPOLATION_ACC."""
    return next(
        (int(r["step"]) for r in records if r.get("train", {}).get("acc", 0) >= INTERPOLATION_ACC), None
    )


def after(c: Curve, start: int) -> Curve:
    """The part of a curve at steps >= start."""
    pairs = [(s, v) for s, v in zip(*c, strict=True) if s >= start]
    return [s for s, _ in pairs], [v for _, v in pairs]


def seed_figures(records: list[dict[str, Any]], split: str, name: str, stat: str) -> dict[str, float] | None:
    """At interpolation, at the peak after it, and at the end, for one run; None if it never interpolates."""
    start = interpolation_step(records)
    if start is None:
        return None
    steps, values = after(curve(records, split, name, stat), start)
    if not steps:
        return None
    peak = int(np.argmax(values))
    # the last decade of steps: its change is the late-phase trend that an extrapolation rests on
    decade = min(range(len(steps)), key=lambda i: abs(steps[i] - steps[-1] / 10))
    return {
        "decade_ago": values[decade],
        "interp_step": start,
        "at_interp": values[0],
        "peak": values[peak],
        "peak_step": steps[peak],
        "last": values[-1],
        "last_step": steps[-1],
    }


def whole_run(
    records: list[dict[str, Any]], split: str, name: str, from_step: int | None
) -> dict[str, float]:
    """The mean margin's peak over every tracked step, the end, and the min margin at both (one run)."""
    steps, means = curve(records, split, name, "mean")
    mins = dict(zip(*curve(records, split, name, "min"), strict=True))
    acc = {int(r["step"]): float(r["train"]["acc"]) for r in records if r.get("train")}
    peak = int(np.argmax(means))
    out = {
        "peak_step": steps[peak],
        "peak_acc": acc[steps[peak]],
        "mean_peak": means[peak],
        "mean_last": means[-1],
        "min_peak": mins[steps[peak]],
        "min_last": mins[steps[-1]],
    }
    if from_step is not None:  # the tracked step nearest the one asked for
        i = min(range(len(steps)), key=lambda k: abs(steps[k] - from_step))
        out.update(fixed_step=steps[i], mean_fixed=means[i], min_fixed=mins[steps[i]])
    return out


def _ci(d: dict[str, Any]) -> str:
    lo_hi = f"[{d['ci'][0]:+.3g}, {d['ci'][1]:+.3g}]" if d["ci"] else "(one seed: no interval)"
    return f"{d['diff']:+.3g} {lo_hi}"


def describe_whole(label: str, per_seed: list[dict[str, float]]) -> str:
    """The sentence for the whole run: the mean's fall from its peak and the min's change meanwhile."""
    fall = paired_ci([s["mean_peak"] for s in per_seed], [s["mean_last"] for s in per_seed])
    rise = paired_ci([s["min_peak"] for s in per_seed], [s["min_last"] for s in per_seed])
    steps = [int(s["peak_step"]) for s in per_seed]
    accs = [f"{s['peak_acc']:.0%}" for s in per_seed]
    text = (
        f"{label}, whole run: mean margin peaks at steps {steps} (train-subset accuracy {accs}); "
        f"last - peak {_ci(fall)} (peak chosen after the fact), min margin over the same span {_ci(rise)}"
    )
    if "fixed_step" in per_seed[0]:
        fixed = paired_ci([s["mean_fixed"] for s in per_seed], [s["mean_last"] for s in per_seed])
        fixed_min = paired_ci([s["min_fixed"] for s in per_seed], [s["min_last"] for s in per_seed])
        at = sorted({int(s["fixed_step"]) for s in per_seed})
        text += f"; from step {at} to the end: mean {_ci(fixed)}, min {_ci(fixed_min)}"
    return text


def describe(label: str, per_seed: list[dict[str, float]], stat: str) -> str:
    """The sentence for one setting, split, margin and statistic, with the intervals over seeds."""
    last = [s["last"] for s in per_seed]
    vs_peak = paired_ci([s["peak"] for s in per_seed], last)
    vs_interp = paired_ci([s["at_interp"] for s in per_seed], last)
    vs_decade = paired_ci([s["decade_ago"] for s in per_seed], last)
    peak_steps = sorted(int(s["peak_step"]) for s in per_seed)
    end = int(statistics.median(s["last_step"] for s in per_seed))
    falls = vs_peak["beyond_noise"] and (vs_peak["diff"] or 0) < 0
    below_interp = vs_interp["beyond_noise"] and (vs_interp["diff"] or 0) < 0

    verdict = (
        f"FALLS after its peak (steps {peak_steps}) by {_ci(vs_peak)} by step {end}"
        if falls
        else f"does not fall beyond noise after its peak (last - peak {_ci(vs_peak)}, peaks {peak_steps})"
    )
    return (
        f"{label}: {stat} margin {verdict}; last - at interpolation {_ci(vs_interp)}"
        + (" (below its value at interpolation)" if below_interp else "")
        + f"; over the last decade of steps {_ci(vs_decade)}"
        + f"; {len(per_seed)} seeds"
    )


def time_share(records: list[dict[str, Any]]) -> float:
    """Tracking's share of the run's time (training + tracking)."""
    train = sum(r.get("time", {}).get("train_s", 0.0) for r in records)
    track = sum(r.get("time", {}).get("track_s", 0.0) for r in records)
    return track / max(train + track, 1e-12)


def margin_names(records: list[dict[str, Any]]) -> list[str]:
    """The tracked margins of the runs: estimators, the bound, then the normalised output margin."""
    names: list[str] = []
    for r in records:
        for name in r.get("train", {}).get("margins", {}):
            if name not in names:
                names.append(name)
    return [*names, "normalised_margin"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", required=True, help="NAME=DIR[,DIR...] (one dir per seed)")
    ap.add_argument("--figure", type=Path, help="draw the curves into this PNG")
    ap.add_argument("--from-step", type=int, help="also compare the end with this step, fixed in advance")
    args = ap.parse_args()
    settings: dict[str, list[list[dict[str, Any]]]] = {}
    for spec in args.setting:
        label, _, dirs = spec.partition("=")
        settings[label] = [read_metrics(Path(d)) for d in dirs.split(",") if d]
    for label, runs in settings.items():
        shares = [time_share(r) for r in runs]
        steps = [r[-1]["step"] for r in runs]
        print(f"\n## {label}: {len(runs)} seeds, {min(steps)}-{max(steps)} steps, "
              f"tracking {statistics.median(shares):.0%} of the time (median over seeds)")  # fmt: skip
        interp = [interpolation_step(r) for r in runs]
        print(f"interpolation (train-subset accuracy >= {INTERPOLATION_ACC:.0%}) at steps {interp}")
        for name in margin_names(runs[0]):
            for split in ("train", "test"):
                for stat in ("mean", "min"):
                    per_seed = [f for r in runs if (f := seed_figures(r, split, name, stat)) is not None]
                    if per_seed:
                        print("- " + describe(f"{name} {split}", per_seed, stat))
                whole = [whole_run(r, split, name, args.from_step) for r in runs]
                print("- " + describe_whole(f"{name} {split}", whole))
    if args.figure:
        draw(settings, args.figure)


def draw(settings: dict[str, list[list[dict[str, Any]]]], path: Path) -> None:
    """Mean and min first-order margin and the normalised margin vs log step, every seed, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("first-order", "mean"), ("first-order", "min"), ("normalised_margin", "mean")]
    fig, axes = plt.subplots(len(settings), len(panels), figsize=(4.2 * len(panels), 3.2 * len(settings)))
    axes = np.asarray(axes).reshape(len(settings), len(panels))
    colors = {"train": "tab:blue", "test": "tab:orange"}
    for i, (label, runs) in enumerate(settings.items()):
        for j, (name, stat) in enumerate(panels):
            ax = axes[i, j]
            for k, records in enumerate(runs):
                start = interpolation_step(records)
                for split, color in colors.items():
                    steps, values = curve(records, split, name, stat)
                    ax.plot(steps, values, color=color, alpha=0.8, label=split if k == 0 else None)
                if start is not None:
                    ax.axvline(start, color="0.6", linewidth=0.6, linestyle=":")
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
            ax.set_xlabel("optimizer step (log scale)")
            ax.set_title(f"{label}\n{stat} {name}", fontsize=9)
            lo = [
                v
                for r in runs
                for s in ("train", "test")
                for st, v in zip(*curve(r, s, name, stat), strict=True)
                if st >= 16
            ]
            if lo and all(math.isfinite(v) for v in lo):
                pad = 0.05 * (max(lo) - min(lo) or 1.0)
                ax.set_ylim(min(lo) - pad, max(lo) + pad)  # fitted after the first epochs
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()
