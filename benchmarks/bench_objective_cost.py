"""Cost of one training epoch per recipe objective (``pgd-at``, ``trades``...) against ``standard``.

One epoch of :func:`marginlab.training.loop.fit` (SGD, batch 128, no margin tracking) on a seeded MNIST
subset with MNIST-MLP, each recipe with its reference parameters (``regularizer.params`` resolved for
MNIST: L∞ ε 0.3, 40 PGD steps). Recipes run round-robin in one process (fresh model, same seed), so
machine drift hits all alike; printed: median wall-clock and process-CPU seconds per epoch and their
ratio to ``standard``. On a shared machine trust the CPU column.

    python benchmarks/bench_objective_cost.py [--recipes standard,pgd-at,trades] [--n 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from marginlab.data import load_dataset
from marginlab.nets.models import build_model
from marginlab.training.loop import TrainConfig, fit
from marginlab.training.recipes import RegularizerConfig, build_objective, reference_lr

MODEL = "mnist-mlp"


def one_epoch(recipe: str, x: torch.Tensor, y: torch.Tensor, threads: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one epoch of ``recipe`` from a fresh seeded model."""
    torch.manual_seed(0)
    model = build_model(MODEL, num_classes=10, input_shape=(1, 28, 28))
    objective = build_objective(RegularizerConfig(recipe=recipe), MODEL, "mnist", seed=0)
    cfg = TrainConfig(epochs=1, device="cpu", progress=False, threads=threads)
    w0, c0 = time.perf_counter(), time.process_time()
    fit(
        model,
        x,
        y,
        cfg,
        lr=reference_lr(recipe, MODEL),
        seed=0,
        device=torch.device("cpu"),
        objective=objective,
    )
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    """Print the median seconds per epoch and the ratio to ``standard`` for every recipe."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="standard,pgd-at,trades")
    ap.add_argument("--n", type=int, default=2000, help="MNIST training images (the quick presets' 2000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    ds = load_dataset("mnist", "train", n=args.n, seed=0)
    one_epoch("standard", ds.x[:256], ds.y[:256], args.threads)  # warm-up: torch's first calls are slow
    times: dict[str, list[tuple[float, float]]] = {r: [] for r in recipes}
    for _ in range(args.repeats):
        for r in recipes:
            times[r].append(one_epoch(r, ds.x, ds.y, args.threads))
    med = {
        r: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for r, t in times.items()
    }
    base = med.get("standard", next(iter(med.values())))
    print(f"MNIST-MLP, {args.n} images, batch 128, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'recipe':<14}{'wall s':>9}{'cpu s':>9}{'wall x':>9}{'cpu x':>9}")
    for r, (w, c) in med.items():
        print(f"{r:<14}{w:>9.2f}{c:>9.2f}{w / base[0]:>9.1f}{c / base[1]:>9.1f}")


if __name__ == "__main__":
    main()
