"""Which orthogonality penalty is the default: its cost per epoch, and whether it does the exact one's job.

Part (a), cost (``--part cost``): one epoch of :func:`marginlab.training.loop.fit` (reference SGD, batch
128, no
margin tracking) on a seeded MNIST subset, for MNIST-MLP and MNIST-CNN, with the ``constraint`` recipe's
penalty computed in each way below; the variants run round-robin in one process (fresh model, same seed),
so drift on a shared machine hits all alike. Prints the median process-CPU and wall seconds per epoch over
the repeats and the ratio of medians to ``standard`` (no penalty). ``exact (autograd)`` is the penalty as
the reference computes it (autograd through the smaller Gram matrix); ``exact`` is marginlab's exact
penalty (same value and gradient, the gradient in closed form).

Part (b), effect (``--part effect``): trains MNIST-MLP with the ``constraint`` recipe (β only) on an MNIST
training subset, exact penalty against the candidate default, over seeds (paired: the same seed, hence
the same initial weights and data order, for both), and prints per seed and as paired differences with a
95% t interval (n − 1 dof): the final Σ‖WWᵀ − I‖², the mean first-order margin on a test subset, and the
worst-case robust accuracy at ε = 1.0 on a smaller test subset (DDN bound pre-pass, then PGD with few
steps: a cheap setting, for comparing two models, not a robustness figure to quote).

    python benchmarks/bench_ortho_default.py --part cost [--repeats 5] [--n-mlp 5000] [--n-cnn 2000]
    python benchmarks/bench_ortho_default.py --part effect [--seeds 3] [--n-train 5000] [--epochs 10]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any

import torch

from marginlab.data import load_dataset
from marginlab.estimators import estimate_margins
from marginlab.nets.models import build_model
from marginlab.robustness import robust_accuracy
from marginlab.training.loop import TrainConfig, fit
from marginlab.training.recipes import RegularizerConfig, build_regularizers, reference_lr
from marginlab.training.regularizers import Orthogonality

DEFAULT = RegularizerConfig(recipe="constraint")  # whatever RegularizerConfig's defaults now pick
EXACT = RegularizerConfig(recipe="constraint", ortho_every=1, ortho_probes=0)


class AutogradOrthogonality(Orthogonality):
    """The exact penalty with autograd's gradient (three Gram-sized products): the pre-closed-form cost."""

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for p in (m.weight for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)):
            w = p.flatten(1)
            wide = w.shape[0] <= w.shape[1]
            gram = w @ w.T if wide else w.T @ w
            eye = torch.eye(gram.shape[0], dtype=w.dtype)
            total = total + (gram - eye).pow(2).sum() + max(w.shape[0] - w.shape[1], 0)
        return total


COST_VARIANTS: dict[str, RegularizerConfig | None] = {
    "standard": None,
    "exact (autograd)": EXACT,
    "exact": EXACT,
    "every=10": RegularizerConfig(recipe="constraint", ortho_every=10, ortho_probes=0),
    "every=50": RegularizerConfig(recipe="constraint", ortho_every=50, ortho_probes=0),
    "probes=1": RegularizerConfig(recipe="constraint", ortho_every=1, ortho_probes=1),
    "probes=4": RegularizerConfig(recipe="constraint", ortho_every=1, ortho_probes=4),
    "every=25": RegularizerConfig(recipe="constraint", ortho_every=25, ortho_probes=0),
    "default": DEFAULT,
}


def regularizers(variant: str, cfg: RegularizerConfig | None, name: str) -> list[Any]:
    if cfg is None:
        return []
    if variant == "exact (autograd)":
        return [AutogradOrthogonality(beta=1e-3)]
    return build_regularizers(cfg, name, "mnist")


def train(
    name: str, variant: str, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int
) -> torch.nn.Module:
    """A freshly seeded ``name`` trained ``epochs`` with ``variant``'s penalty (reference SGD, lr 0.01)."""
    cfg = COST_VARIANTS[variant]
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, input_shape=tuple(x.shape[1:]))
    regs = regularizers(variant, cfg, name)
    if regs and isinstance(regs[0], Orthogonality):
        regs[0].seed = seed  # the probe stream follows the run's seed, as RegularizerConfig.seed does
    tc = TrainConfig(epochs=epochs, device="cpu", progress=False)
    lr = reference_lr("constraint" if regs else "standard", name)
    fit(model, x, y, tc, lr=lr, seed=seed, device=torch.device("cpu"), regularizers=regs)
    return model


def bench_cost(name: str, n: int, repeats: int) -> None:
    data = load_dataset("mnist", "train", n=n, seed=0)
    train(name, "standard", data.x[:256], data.y[:256], 1, 0)  # warm-up (allocator, kernels)
    cpu: dict[str, list[float]] = {v: [] for v in COST_VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in COST_VARIANTS}
    for _ in range(repeats):
        for variant in COST_VARIANTS:
            t0, c0 = time.perf_counter(), time.process_time()
            train(name, variant, data.x, data.y, 1, 0)
            wall[variant].append(time.perf_counter() - t0)
            cpu[variant].append(time.process_time() - c0)
    steps = -(-n // 128)
    base_c, base_w = statistics.median(cpu["standard"]), statistics.median(wall["standard"])
    print(f"\n{name}: one epoch = {steps} steps on {n} MNIST images, median of {repeats} "
          f"(torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"{'variant':18s} {'cpu s':>7s} {'ratio':>6s} {'wall s':>7s} {'ratio':>6s}")
    for v in COST_VARIANTS:
        c, w = statistics.median(cpu[v]), statistics.median(wall[v])
        print(f"{v:18s} {c:7.3f} {c / base_c:6.2f} {w:7.3f} {w / base_w:6.2f}")
    print(f"(default = every={DEFAULT.ortho_every}, probes={DEFAULT.ortho_probes})")


# two-sided 97.5% quantiles of Student's t, by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_ci(diffs: list[float]) -> tuple[float, float]:
    """Mean of the paired differences and the half-width of its 95% t interval (n − 1 dof)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan
    t = _T975.get(n - 1, 1.96)
    return mean, t * statistics.stdev(diffs) / math.sqrt(n)


def measure(model: torch.nn.Module, xm, ym, xr, yr) -> dict[str, float]:
    model.eval()
    pen = Orthogonality(beta=1.0).penalty(model).item()
    margins = estimate_margins(model, xm, ym, ["first-order"])["first-order"].values
    rob = robust_accuracy(model, xr, yr, [1.0], attacks=("pgd",), bound="ddn", steps=20, step_size=0.1)
    return {"penalty": pen, "mean margin": margins.mean().item(), "robust acc": rob.worst_case[0]}


def bench_effect(
    seeds: int, n_train: int, epochs: int, n_margin: int, n_robust: int, others: list[str]
) -> None:
    tr = load_dataset("mnist", "train", n=n_train, seed=0)
    te = load_dataset("mnist", "test", n=n_margin, seed=0)
    xr, yr = te.x[:n_robust], te.y[:n_robust]
    print(f"\nmnist-mlp, constraint recipe (beta 1e-3, lr 0.01), {n_train} training images, {epochs} "
          f"epochs; mean first-order margin on {n_margin} test images; robust accuracy at eps 1.0 on "
          f"{n_robust} (DDN bound + PGD 20 steps of 0.1); default = every={DEFAULT.ortho_every}, "
          f"probes={DEFAULT.ortho_probes}")  # fmt: skip
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in ["exact", "default", *others]}
    for seed in range(seeds):
        for variant in rows:
            t0 = time.perf_counter()
            model = train("mnist-mlp", variant, tr.x, tr.y, epochs, seed)
            secs = time.perf_counter() - t0
            rows[variant].append(measure(model, te.x, te.y, xr, yr))
            vals = "  ".join(f"{k} {v:.4f}" for k, v in rows[variant][-1].items())
            print(f"seed {seed} {variant:10s} {vals}  (train {secs:.0f} s)", flush=True)
    for other in rows:
        if other == "exact":
            continue
        print(f"\n{other} against exact, paired over {seeds} seeds")
        print(f"{'metric':12s} {'exact mean':>11s} {'other mean':>11s} {'paired diff':>12s} {'95% CI':>22s}")
        for key in rows["exact"][0]:
            a = [r[key] for r in rows["exact"]]
            b = [r[key] for r in rows[other]]
            d, h = paired_ci([bi - ai for ai, bi in zip(a, b, strict=True)])
            ci = f"[{d - h:+.4f}, {d + h:+.4f}]"
            print(f"{key:12s} {statistics.fmean(a):11.4f} {statistics.fmean(b):11.4f} {d:+12.4f} {ci:>22s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["cost", "effect", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-mlp", type=int, default=5000, help="MNIST images per timed MLP epoch")
    ap.add_argument("--n-cnn", type=int, default=2000, help="MNIST images per timed CNN epoch")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-margin", type=int, default=1000, help="test images for the mean margin")
    ap.add_argument("--n-robust", type=int, default=100, help="test images for the robust accuracy")
    ap.add_argument("--also", default="", help="more variants for part (b), e.g. standard,every=25,probes=4")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread, and ratios rather than seconds
    if args.part in ("cost", "both"):
        bench_cost("mnist-mlp", args.n_mlp, args.repeats)
        bench_cost("mnist-cnn", args.n_cnn, args.repeats)
    if args.part in ("effect", "both"):
        others = [v for v in args.also.split(",") if v]
        unknown = [v for v in others if v not in COST_VARIANTS or v == "exact (autograd)"]
        if unknown:
            ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(COST_VARIANTS)}")
        bench_effect(args.seeds, args.n_train, args.epochs, args.n_margin, args.n_robust, others)


if __name__ == "__main__":
    main()
