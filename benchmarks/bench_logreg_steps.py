"""How fast does GD on MNIST 0-vs-1 reach the max-margin regime, by step size? (a benchmark, not a test)

For each step (``eta = f · 2/L``; constant, or normalised by the loss) it runs full-batch GD from zero on
all 12,665 training images and prints, at checkpoints, the training minimum and mean exact L2 margin and
the cosine of (w, b) to the bias-penalised SVM (GD's limit in direction), plus the loss and whether it
ever rose. All variants run side by side in one process on the same data.

    python benchmarks/bench_logreg_steps.py --steps 15000 --fractions 0.99,10,100,1000 --normalized 0.5
"""

from __future__ import annotations

import argparse
import time

import torch

from marginlab.core.linear import binary_margins
from marginlab.core.logistic import LogisticGD
from marginlab.core.svm import direction_cosine, hard_margin_svm
from marginlab.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15000)
    ap.add_argument("--fractions", default="0.99,10,100,1000", help="constant steps, as multiples of 2/L")
    ap.add_argument("--normalized", default="0.5", help="normalised-GD steps (multiples of 2/L); '' for none")
    ap.add_argument("--checkpoints", default="100,1000,3000,15000")
    ap.add_argument("--dataset", default="mnist:0,1")
    args = ap.parse_args()

    train = load_dataset(args.dataset, "train", labels="pm1")
    x, y = train.x.flatten(1).double(), train.y.double()
    svm = hard_margin_svm(x, y, bias="regularized")
    print(f"{args.dataset}: N={len(y)}, SVM (bias penalised) margin {svm.margin:.4f}")
    variants = [(float(f), False) for f in args.fractions.split(",") if f]
    variants += [(float(f), True) for f in args.normalized.split(",") if f]
    marks = sorted({int(c) for c in args.checkpoints.split(",")} | {args.steps})
    marks = [m for m in marks if m <= args.steps]
    print(f"{'step':>14} {'t':>6} {'min margin':>11} {'mean margin':>11} {'cos':>7} {'loss':>10} {'s':>6}")
    for frac, norm in variants:
        gd = LogisticGD(
            x, y, torch.zeros(x.shape[1], dtype=torch.float64), 0.0, step_fraction=frac, normalized=norm
        )
        done, seconds, prev, rose = 0, 0.0, gd.loss(), False
        for mark in marks:
            t0 = time.perf_counter()
            todo = mark - done
            while todo > 0:  # the loss is checked every 10 steps
                gd.step(min(10, todo))
                todo -= min(10, todo)
                if not rose:
                    cur = gd.loss()
                    rose, prev = cur > prev, cur
            seconds += time.perf_counter() - t0
            done = mark
            w, b = gd.weights()
            m = binary_margins(w, torch.tensor(b, dtype=torch.float64), x, y, p=2, signed=True)
            cos = direction_cosine(w, b, svm.w.double(), float(svm.b))
            name = f"{'norm ' if norm else ''}{frac:g}x2/L"
            print(
                f"{name:>14} {mark:>6} {float(m.min()):>11.4f} {float(m.mean()):>11.4f} {cos:>7.4f} "
                f"{gd.loss():>10.3e} {seconds:>6.1f}" + ("  (loss rose)" if rose else "")
            )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
