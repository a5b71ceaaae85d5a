"""Every margin estimator side by side on a trained MNIST-MLP and MNIST-CNN, plus sampling vs a loop.

For each model: ``n`` correctly classified test points (the first ones of a seeded draw), and for
each estimator the median margin, the median per-point ratio to ``best`` (the smallest perturbation
any of DeepFool, DDN, FMN, FAB found) and the time. Then the ``sampling`` estimator (vectorised:
shared samples across classes, several points per pass) against a per-point, per-class loop written
like the reference code, with the reference's settings (R=5, 1024 samples per batch); timings are
linear in the number of batches, so both are timed with ``--sampling-batches`` and scaled to 50.

    python benchmarks/bench_estimators.py                      # trains briefly, 1000 points each
    python benchmarks/bench_estimators.py --n-mlp 200 --n-cnn 50 --epochs-cnn 1
    python benchmarks/bench_estimators.py --weights-mlp mlp.pt --weights-cnn cnn.pt
"""

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from marginlab.data import load_dataset
from marginlab.estimators import ESTIMATORS, build_estimator, combine_upper_bounds
from marginlab.estimators.attacks import FMN
from marginlab.nets.models import build_model, load_weights

ATTACKS = ["deepfool", "ddn", "fmn", "fab"]
REF_BATCHES, REF_SAMPLES, REF_RADIUS = 50, 1024, 5.0


class StockFMN(FMN):
    """foolbox 3.3.4's L2 FMN exactly as shipped (default step 1.0), to show what the fix changes."""

    def _attack(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, p: float) -> torch.Tensor:
        from foolbox.attacks import L2FMNAttack

        return self._foolbox(L2FMNAttack(steps=self.steps), model, x, labels)


def train(name: str, epochs: int, seed: int) -> nn.Module:
    """SGD (momentum 0.9, Nesterov, batch 128, lr 0.05) for a few epochs on MNIST train."""
    torch.manual_seed(seed)
    data = load_dataset("mnist", "train")
    model = build_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            opt.step()
    return model.eval()


def correct_points(model: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The first ``n`` correctly classified points of a seeded shuffle of MNIST test; test accuracy."""
    test = load_dataset("mnist", "test")
    with torch.no_grad():
        ok = model(test.x).argmax(1) == test.y
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    keep = order[ok[order]][:n]
    return test.x[keep], test.y[keep], float(ok.float().mean())


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def estimator_table(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sampling_batches: int, sampling_n: int
) -> None:
    """Print the table; ``sampling`` (reduced to ``sampling_batches x 256`` samples) on the first
    ``sampling_n`` points only, compared with ``best`` on those points."""
    rows: dict[str, tuple[str, torch.Tensor, float]] = {}
    for name in ["first-order", "lipschitz", *ATTACKS]:  # exact-linear: linear models only
        values, secs = timed(build_estimator(name), model, x, y)
        rows[name] = (ESTIMATORS.get(name).kind.value, values, secs)
    values, secs = timed(StockFMN(), model, x, y)
    rows["fmn, foolbox as shipped"] = ("upper bound", values, secs)
    best = combine_upper_bounds([rows[a][1] for a in ATTACKS])
    rows["best (of the 4 attacks)"] = ("upper bound", best, sum(rows[a][2] for a in ATTACKS))
    sampler = build_estimator("sampling", n_batches=sampling_batches, n_samples=256)
    values, secs = timed(sampler, model, x[:sampling_n], y[:sampling_n])
    rows[f"sampling {sampling_batches}x256, {len(values)} pts"] = ("estimate", values, secs)
    print(f"{'estimator':28s} {'kind':12s} {'median':>9s} {'med/best':>9s} {'time s':>8s} {'ms/pt':>7s}")
    for label, (kind, values, secs) in rows.items():
        ratio = float((values / best[: len(values)]).median())
        print(
            f"{label:28s} {kind:12s} {float(values.median()):9.4g} {ratio:9.3f} {secs:8.1f} "
            f"{1000 * secs / len(values):7.1f}"
        )
    lower_ok = bool((rows["lipschitz"][1] <= best).all())
    print(f"lipschitz <= best on every point: {lower_ok}; inf in best: {int(best.isinf().sum())}")


def reference_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_batches: int) -> torch.Tensor:
    """The reference's CLEVER-style estimate, one point and one class at a time (for timing only)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x0, c in zip(x, y.tolist(), strict=True):
        with torch.no_grad():
            f0 = model(x0[None])[0]
        best = math.inf
        for j in range(len(f0)):
            if j == c:
                continue
            max_norm = 0.0
            for _ in range(n_batches):
                d = torch.randn(REF_SAMPLES, x0.numel(), generator=gen)
                d = d / d.norm(dim=1, keepdim=True)
                d = REF_RADIUS * torch.rand(REF_SAMPLES, 1, generator=gen).pow(1 / x0.numel()) * d
                xs = (x0[None] + d.view(-1, *x0.shape)).requires_grad_(True)
                logits = model(xs)
                (grad,) = torch.autograd.grad((logits[:, c] - logits[:, j]).sum(), xs)
                max_norm = max(max_norm, float(grad.flatten(1).norm(dim=1).max()))
            best = min(best, REF_RADIUS, float(f0[c] - f0[j]) / max_norm)
        out.append(best)
    return torch.tensor(out)


def sampling_speed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_batches: int, points: int) -> None:
    scale = REF_BATCHES / n_batches
    xs, ys = x[:points], y[:points]
    vec = build_estimator("sampling", n_batches=n_batches, points_per_pass=points)
    v_out, v_secs = timed(vec, model, xs, ys)
    l_out, l_secs = timed(reference_loop, model, xs[:1], ys[:1], n_batches)
    v_pt, l_pt = scale * v_secs / points, scale * l_secs
    print(
        f"sampling, reference settings (R=5, 50x1024 samples), per point: vectorised {v_pt:.1f} s "
        f"({points} points), loop {l_pt:.1f} s (1 point); loop / vectorised = {l_pt / v_pt:.2f}x "
        f"[timed with {n_batches} batches, scaled x{scale:g}]"
    )
    print(f"  estimates of the first point: vectorised {float(v_out[0]):.4f}, loop {float(l_out[0]):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-mlp", type=int, default=1000)
    ap.add_argument("--n-cnn", type=int, default=1000)
    ap.add_argument("--epochs-mlp", type=int, default=2)
    ap.add_argument("--epochs-cnn", type=int, default=1)
    ap.add_argument("--weights-mlp")
    ap.add_argument("--weights-cnn")
    ap.add_argument("--sampling-batches", type=int, default=2, help="batches for the timing (scaled to 50)")
    ap.add_argument("--sampling-points", type=int, default=4, help="points vectorised in the timing")
    ap.add_argument("--sampling-n", type=int, default=100, help="points for the sampling row of the table")
    ap.add_argument("--save-dir", help="save the trained weights here (state_dicts, for --weights-*)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    for name, n, epochs, weights in [
        ("mnist-mlp", args.n_mlp, args.epochs_mlp, args.weights_mlp),
        ("mnist-cnn", args.n_cnn, args.epochs_cnn, args.weights_cnn),
    ]:
        if weights:
            model, secs = load_weights(build_model(name), weights).eval(), 0.0
        else:
            model, secs = timed(train, name, epochs, seed=0)
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), Path(args.save_dir) / f"{name}.pt")
        x, y, acc = correct_points(model, n)
        how = f"loaded from {weights}" if weights else f"trained {epochs} epoch(s) in {secs:.0f} s"
        print(f"\n== {name}: {how}; test accuracy {acc:.4f}; {len(x)} correctly classified test points, L2")
        estimator_table(model, x, y, args.sampling_batches, args.sampling_n)
        sampling_speed(model, x, y, args.sampling_batches, args.sampling_points)
    print("\n(med/best: median of per-point ratios to best; best's time is the sum of the 4 attacks)")


if __name__ == "__main__":
    main()
