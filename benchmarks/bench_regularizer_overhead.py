"""Overhead of the ``regularized`` recipe per training epoch, against ``standard``, through the real loop.

One epoch of :func:`marginlab.training.loop.fit` (reference SGD settings, batch 128, no margin tracking) on a
seeded MNIST subset, for MNIST-MLP and MNIST-CNN, with the recipes and orthogonality variants below. The
variants run round-robin in one process (fresh model each time, same seed), so machine drift hits all
of them alike; the script prints the median wall-clock and process-CPU seconds per epoch over the repeats
and the ratio of medians to ``standard`` (the overhead; issue 4's target is <= 1.10). On a shared
machine trust the CPU-time column.

    python benchmarks/bench_regularizer_overhead.py [--repeats 5] [--n-mlp 5000] [--n-cnn 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from marginlab.data import load_dataset
from marginlab.nets.models import build_model
from marginlab.training.loop import TrainConfig, fit
from marginlab.training.recipes import RegularizerConfig, build_regularizers, reference_lr

VARIANTS: dict[str, RegularizerConfig] = {
    "standard": RegularizerConfig(recipe="standard"),
    "constraint (exact)": RegularizerConfig(recipe="constraint", ortho_every=1),
    "regularized (exact)": RegularizerConfig(recipe="regularized", ortho_every=1),
    "regularized, ortho_every=10": RegularizerConfig(recipe="regularized", ortho_every=10),
    "regularized, ortho_every=50": RegularizerConfig(recipe="regularized", ortho_every=50),
    "regularized, ortho_probes=8": RegularizerConfig(recipe="regularized", ortho_every=1, ortho_probes=8),
    "regularized, ortho_probes=1": RegularizerConfig(recipe="regularized", ortho_every=1, ortho_probes=1),
}


def one_epoch(name: str, reg: RegularizerConfig, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(wall, process CPU) seconds of one training epoch from a fresh seeded model."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, input_shape=tuple(x.shape[1:]))
    regs = build_regularizers(reg, name, "mnist")
    cfg = TrainConfig(epochs=1, device="cpu", progress=False)
    lr = reference_lr(reg.recipe, name)
    t0, c0 = time.perf_counter(), time.process_time()
    fit(model, x, y, cfg, lr=lr, seed=0, device=torch.device("cpu"), regularizers=regs)
    return time.perf_counter() - t0, time.process_time() - c0


def bench(name: str, n: int, repeats: int) -> None:
    data = load_dataset("mnist", "train", n=n, seed=0)
    one_epoch(name, VARIANTS["standard"], data.x[:256], data.y[:256])  # warm-up (allocator, kernels)
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant, reg in VARIANTS.items():
            w, c = one_epoch(name, reg, data.x, data.y)
            wall[variant].append(w)
            cpu[variant].append(c)
    base_w, base_c = statistics.median(wall["standard"]), statistics.median(cpu["standard"])
    print(f"\n{name}: one epoch on {n} MNIST images, batch 128, median of {repeats} (torch threads "
          f"{torch.get_num_threads()})")  # fmt: skip
    print(f"{'variant':30s} {'wall s':>8s} {'ratio':>6s} {'cpu s':>8s} {'ratio':>6s}")
    for variant in VARIANTS:
        w, c = statistics.median(wall[variant]), statistics.median(cpu[variant])
        print(f"{variant:30s} {w:8.3f} {w / base_w:6.2f} {c:8.3f} {c / base_c:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-mlp", type=int, default=5000, help="MNIST images per MLP epoch")
    ap.add_argument("--n-cnn", type=int, default=2000, help="MNIST images per CNN epoch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    bench("mnist-mlp", args.n_mlp, args.repeats)
    bench("mnist-cnn", args.n_cnn, args.repeats)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
