"""How tight are the default margin upper bounds? Candidate settings against a long-run reference.

On a briefly trained MNIST-CNN and MNIST-MLP (weights cached in ``--cache``, so reruns skip training),
``n`` correctly classified test points (L2): a long-run *reference* (DDN and FMN with ``--ref-steps``
steps, per point the smallest perturbation either found, or any candidate found: the tightest bound
known) and, side by side in this process, the candidate settings of DDN, FMN, DeepFool and ``best``.
Per candidate: the median and 90th percentile of the per-point ratio candidate / reference (>= 1: an
upper bound can only overstate), the share of points within 1% of the reference, and the CPU time (seconds,
and the ratio to the cheapest candidate). A ``best`` row's time is the sum of its attacks' times.

    python benchmarks/bench_bounds.py                       # 100 points per model, reference 1000 steps
    python benchmarks/bench_bounds.py --n 30 --ref-steps 500 --models cnn
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from marginlab.data import load_dataset
from marginlab.estimators import build_estimator, combine_upper_bounds
from marginlab.nets.models import build_model

# Small enough to train in a minute on one CPU thread, and ~98% test accuracy after 3 epochs.
ARCHS = {
    "cnn": ("mnist-cnn", {"channels": (16, 32), "fc": (100,)}),
    "mlp": ("mnist-mlp", {}),
    "cnn-preset": ("mnist-cnn", {}),  # the full preset: 32, 32, 64, 64 channels, fc 200, 200
}


def trained_model(kind: str, cache: Path, n_train: int = 10000, epochs: int = 3, seed: int = 0) -> nn.Module:
    """A ``kind`` ("cnn"/"mlp") net trained with Adam (lr 1e-3, batch 64) on the first ``n_train`` MNIST
    training images; the weights are cached in ``cache`` (keyed by the settings)."""
    preset, kwargs = ARCHS[kind]
    model = build_model(preset, **kwargs)
    path = cache / f"marginlab-bench-{kind}-{n_train}-{epochs}-{seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(seed)
    data = load_dataset("mnist", "train")
    x, y = data.x[:n_train], data.y[:n_train]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def mnist_points(
    model: nn.Module, n: int, correct_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``x [n,1,28,28]``, ``y [n]``: the first ``n`` (correctly classified) points of a seeded shuffle of
    MNIST test; and the test accuracy."""
    test = load_dataset("mnist", "test")
    with torch.no_grad():
        ok = torch.cat([model(xb).argmax(1) for xb in test.x.split(1000)]) == test.y
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    keep = (order[ok[order]] if correct_only else order)[:n]
    return test.x[keep], test.y[keep], float(ok.float().mean())


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """``fn()`` and its CPU seconds (process time: with one thread, fairer than wall time on a busy box)."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def attack(name: str, **params: object) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    est = build_estimator(name, **params)
    return lambda model, x, y: est(model, x, y, p=2)


def candidates() -> dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The single attacks compared (``best`` rows are combined from them afterwards)."""
    return {
        "deepfool (default)": attack("deepfool"),
        "ddn 100": attack("ddn", steps=100),
        "ddn 200": attack("ddn", steps=200),
        "ddn 300": attack("ddn", steps=300),
        "fmn 100 step 1.0": attack("fmn", steps=100, max_stepsize=1.0),
        "fmn 100 step 0.3": attack("fmn", steps=100, max_stepsize=0.3),
        "fmn 200 step 0.3": attack("fmn", steps=200, max_stepsize=0.3),
        "ddn (default)": attack("ddn"),
        "best (default)": attack("best"),
    }


BEST_ROWS = {
    "best deepfool+ddn 100": ("deepfool (default)", "ddn 100"),
    "best deepfool+ddn 200": ("deepfool (default)", "ddn 200"),
    "best deepfool+ddn 300": ("deepfool (default)", "ddn 300"),
    "best ddn 100+fmn 100 step 1.0": ("ddn 100", "fmn 100 step 1.0"),
    "best deepfool+ddn 200+fmn 100 step 1.0": ("deepfool (default)", "ddn 200", "fmn 100 step 1.0"),
}


def table(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ref_steps: int) -> None:
    rows: dict[str, tuple[torch.Tensor, float]] = {}
    for label, fn in candidates().items():
        rows[label] = timed(lambda fn=fn: fn(model, x, y))
    for label, parts in BEST_ROWS.items():
        combined = combine_upper_bounds([rows[p][0] for p in parts])
        rows[label] = (combined, sum(rows[p][1] for p in parts))
    long_runs = {
        f"reference run: ddn {ref_steps}": attack("ddn", steps=ref_steps),
        f"reference run: fmn {ref_steps} step 1.0": attack("fmn", steps=ref_steps, max_stepsize=1.0),
        f"reference run: fmn {ref_steps} step 0.3": attack("fmn", steps=ref_steps, max_stepsize=0.3),
    }
    ref_rows = {label: timed(lambda fn=fn: fn(model, x, y)) for label, fn in long_runs.items()}
    ref = combine_upper_bounds([v for v, _ in [*ref_rows.values(), *rows.values()]])
    cheapest = min(secs for _, secs in rows.values())
    print(f"{'candidate':40s} {'median':>7s} {'p90':>7s} {'<=1%':>6s} {'cpu s':>7s} {'x cheapest':>10s}")
    for label, (values, secs) in {**rows, **ref_rows}.items():
        ratio = values / ref
        print(
            f"{label:40s} {float(ratio.median()):7.4f} {float(ratio.quantile(0.9)):7.4f} "
            f"{float((ratio <= 1.01).double().mean()):6.2f} {secs:7.1f} {secs / cheapest:10.1f}"
        )
    print(f"reference: median margin {float(ref.median()):.4f}, inf: {int(ref.isinf().sum())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="correctly classified test points per model")
    ap.add_argument("--ref-steps", type=int, default=1000, help="steps of the long reference runs")
    ap.add_argument("--models", default="cnn,mlp", help="comma-separated: cnn, mlp, cnn-preset")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"), help="where trained weights are cached")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), L2")
    for kind in args.models.split(","):
        model, secs = timed(lambda kind=kind: trained_model(kind, args.cache))
        x, y, acc = mnist_points(model, args.n)
        print(f"\n== MNIST-{kind.upper()} (ready in {secs:.0f} s), test accuracy {acc:.4f}, {len(x)} points")
        table(model, x, y, args.ref_steps)
    print("\n(ratio: per point candidate / reference; reference: smallest over the long runs and all rows)")


if __name__ == "__main__":
    main()
