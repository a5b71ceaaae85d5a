"""How tight and how fast is `crown` on trained MNIST nets? Brackets best / crown and seconds per point.

Reads the trained sub-runs (``config.json`` and ``model.pt``) of a comparison run such as
``marginlab run configs/compare-quick.toml --out DIR`` (bases ``mnist-cnn`` and ``mnist-mlp``, recipes
standard / constraint / regularized). Per sub-run and norm, on the first ``--n`` correctly classified
points of a seeded shuffle of MNIST test, box domain:

- ``best``: the bracket's attacks combined (DeepFool + DDN for L2, DeepFool + FMN for L-inf);
- ``crown``: the certified radius with CROWN intermediate bounds (receptive-field windows on the conv
  layers) and, with ``--alpha-steps``, alpha-CROWN on the final specification;
- ``ibp``: the same search with interval intermediate bounds, the behaviour of marginlab before
  CROWN went through convolutions (the baseline; run in the same process).

Printed per row: the median and 90th percentile of best / crown (>= 1: the bracket's width), the same
median for ``ibp``, and the CPU seconds per point (process time, one thread: run it with
``OMP_NUM_THREADS=1``; the script also sets ``torch.set_num_threads(1)``). Nothing is asserted.

    OMP_NUM_THREADS=1 python benchmarks/bench_crown_cnn.py /tmp/models/cmp-quick --n 10
    OMP_NUM_THREADS=1 python benchmarks/bench_crown_cnn.py DIR --n 20 --bases mnist-cnn --alpha-steps 20
"""

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from marginlab.data import load_dataset
from marginlab.estimators import build_estimator, combine_upper_bounds
from marginlab.estimators.presets import bracket_attacks
from marginlab.lab.names import WEIGHTS, subrun_dir
from marginlab.lab.readers import read_config
from marginlab.nets.loading import load_model


def load_subrun(run_dir: Path, base: str, recipe: str, seed: int) -> nn.Module:
    """The trained model of one sub-run (its registry name and options from its ``config.json``)."""
    sub = subrun_dir(run_dir, base, recipe, seed)
    model = read_config(sub)["model"]
    loaded = load_model(model["name"], sub / WEIGHTS, num_classes=10, input_shape=(1, 28, 28),
                        options=model.get("options") or {})  # fmt: skip
    return loaded.model.eval()


def mnist_points(model: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n,1,28,28]``, ``y [n]``: the first ``n`` correctly classified points of a seeded shuffle."""
    test = load_dataset("mnist", "test")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: 20 * n]
    with torch.no_grad():
        ok = model(test.x[order]).argmax(1) == test.y[order]
    keep = order[ok][:n]
    return test.x[keep], test.y[keep]


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """``fn()`` and its CPU seconds."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def row(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float, alpha_steps: int) -> dict[str, float]:
    """The figures of one model and norm (see the module doc)."""
    best = combine_upper_bounds([build_estimator(a)(model, x, y, p=p) for a in bracket_attacks(p)]).abs()
    out: dict[str, float] = {}
    runs = {"crown": {"alpha_steps": alpha_steps}, "ibp": {"intermediate": "ibp"}}
    for label, params in runs.items():
        est = build_estimator("crown", rtol=1e-3, **params)
        radius, secs = timed(lambda est=est: est(model, x, y, p=p))
        ratio = best / radius.abs()
        out[f"{label} median"] = float(ratio.median())
        out[f"{label} p90"] = float(ratio.quantile(0.9))
        out[f"{label} s/pt"] = secs / len(x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "run_dir", type=Path, help="a comparison run directory (with runs/<base>/<recipe>-seed<k>)"
    )
    ap.add_argument("--n", type=int, default=10, help="correctly classified test points per model")
    ap.add_argument("--bases", default="mnist-cnn,mnist-mlp")
    ap.add_argument("--recipes", default="standard,constraint,regularized")
    ap.add_argument("--norms", default="2,inf")
    ap.add_argument("--seed", type=int, default=0, help="the sub-runs' seed")
    ap.add_argument("--alpha-steps", type=int, default=0, help="alpha-CROWN steps for crown (0: off)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    head = f"{'base':10s} {'recipe':12s} {'norm':>4s} {'crown med':>9s} {'p90':>7s} {'s/pt':>7s}"
    print(f"{head} {'ibp med':>9s} {'s/pt':>6s}")
    for base in args.bases.split(","):
        for recipe in args.recipes.split(","):
            model = load_subrun(args.run_dir, base, recipe, args.seed)
            x, y = mnist_points(model, args.n)
            for norm in args.norms.split(","):
                p = math.inf if norm == "inf" else float(norm)
                r = row(model, x, y, p, args.alpha_steps)
                print(
                    f"{base:10s} {recipe:12s} {norm:>4s} {r['crown median']:9.2f} {r['crown p90']:7.2f} "
                    f"{r['crown s/pt']:7.2f} {r['ibp median']:9.1f} {r['ibp s/pt']:6.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
