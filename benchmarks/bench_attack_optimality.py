"""How optimal are the minimum-norm attacks? Their per-point distances against the *exact* margins.

For a model and a set of test points, every attack ``a`` gives a distance ``d_a(i) >= d*(i)`` per point
(an attack's perturbation is an upper bound of the margin). With the exact margins ``d*`` of ``mip``
(on nets where it solves every point) as the reference, this prints per attack and norm:

- ``median`` and ``p90`` of ``d_a / d*`` over the correctly classified points, and the share within 1%;
- the AttackBench *optimality* (Cina et al. 2024, "AttackBench"): the robust-accuracy curve of an attack,
  ``RA_a(eps) = share of points with d_a > eps``, lies above the reference's; with ``A`` the area under a
  curve on ``[0, m]`` (``m`` = the largest reference distance; attack distances clipped to ``m``) and
  ``c`` the clean accuracy,

      optimality = 1 - (A_a - A_ref) / (c m - A_ref)

  (1: the attack matches the reference everywhere; 0: it breaks no point below ``m``). Here the areas are
  integrated exactly (the curves are step functions: ``A = mean_i min(d(i), m)``, misclassified points
  at 0), where AttackBench's own script applies the trapezoidal rule to the same steps.
  ``opt-exact`` uses the exact margins as the reference, ``opt-best`` the best attack found (what a
  benchmark without exact margins must use): the gap between them is how much a best-known reference
  flatters the attacks.

Attacks: DeepFool, DDN (L2), FMN, FAB (marginlab's estimators), ``best`` (per-point minimum of those),
and an APGD search: APGD-CE + APGD-T (AutoAttack's, 100 iterations) on a geometric grid of radii, then
bisection per point; its distance is the norm of the smallest misclassifying perturbation found.

Models: the 8x8-digits MLP 64-32-32-10 of ``bench_exact.py`` (standard and regularized recipes), where
``mip`` solves every point in seconds; ``--mnist`` adds the MNIST MLP 784-64-64-10 (exact margins within
``--time-limit`` per point: only the points solved exactly are used).

    python benchmarks/bench_attack_optimality.py                       # digits MLPs, 100 points, both norms
    python benchmarks/bench_attack_optimality.py --n 30 --norms inf --recipes standard
    python benchmarks/bench_attack_optimality.py --models "" --cnn RUN_DIR...   # CNNs: best-known reference

On CNNs (``--cnn``, train run directories) no exact margin is known: the reference is the best distance any
attack found, and the certified lower bound (``crown``) says how far that reference may still be off.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from marginlab.estimators import build_estimator
from marginlab.estimators.best import estimate_margins
from marginlab.lab.names import WEIGHTS
from marginlab.lab.readers import read_config
from marginlab.nets.loading import load_model
from marginlab.nets.models import MarginNet, build_model
from marginlab.robustness.attacks import RobustnessSettings, autoattack

sys.path.insert(0, str(Path(__file__).parent))
from bench_exact import load, train  # noqa: E402  (a sibling script, not a package)

ATTACKS = {2.0: ["deepfool", "ddn", "fmn", "fab"], math.inf: ["deepfool", "fmn", "fab"]}


def areas(d: np.ndarray, m: float) -> float:
    """Area under the robust-accuracy curve on ``[0, m]``: ``mean_i min(d_i, m)`` (``d_i = 0`` for a
    misclassified point): the exact integral of the step function ``eps -> share of d_i > eps``."""
    return float(np.minimum(np.maximum(d, 0.0), m).mean())


def optimality(d_attack: np.ndarray, d_ref: np.ndarray) -> float:
    """AttackBench optimality of distances ``d_attack [N]`` against ``d_ref [N]`` (0 for misclassified)."""
    m = float(d_ref.max())
    clean = float((d_ref > 0).mean())
    a_ref, a_att = areas(d_ref, m), areas(d_attack, m)
    denom = clean * m - a_ref
    return 1.0 if denom <= 0 else 1.0 - (a_att - a_ref) / denom


def _apgd(model: MarginNet, x: torch.Tensor, y: torch.Tensor, p: float, eps: float) -> np.ndarray:
    """Per point ``[n]``: the norm of the misclassifying perturbation APGD-CE + APGD-T find within
    radius ``eps`` (``inf`` where they find none)."""
    settings = RobustnessSettings(
        norm="L2" if p == 2.0 else "Linf", attacks=("autoattack",), bound=None,
        aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"), aa_iters=100,
    )  # fmt: skip
    x_adv, _ = autoattack(model, x, y, eps, settings)
    with torch.no_grad():
        wrong = (model(x_adv).argmax(1) != y).numpy()
    dist = torch.linalg.vector_norm((x_adv - x).flatten(1).double(), ord=p, dim=1).numpy()
    return np.where(wrong & (dist <= eps * (1 + 1e-6)), dist, np.inf)


def apgd_search(
    model: MarginNet, x: torch.Tensor, y: torch.Tensor, p: float, hi: np.ndarray, steps: int = 6
) -> np.ndarray:
    """Per point ``[n]``, the smallest perturbation norm APGD finds: a geometric grid of 10 radii from
    0.3x the smallest to 1.2x the largest of ``hi [n]`` (all points at once), then ``steps`` bisections per
    point between its largest failed and smallest successful radius (one point at a time: AutoAttack
    takes one radius per call)."""
    finite = hi[np.isfinite(hi) & (hi > 0)]
    grid = np.geomspace(0.3 * finite.min(), 1.2 * finite.max(), 10)
    best, below = np.full(len(x), np.inf), np.zeros(len(x))
    for eps in grid:
        found = _apgd(model, x, y, p, float(eps))
        below = np.where(np.isinf(best) & np.isinf(found), eps, below)
        best = np.minimum(best, found)
    for i in np.flatnonzero(np.isfinite(best)):
        lo, up = below[i], best[i]
        for _ in range(steps):
            mid = (lo + up) / 2
            found = _apgd(model, x[i : i + 1], y[i : i + 1], p, float(mid))[0]
            lo, up = (lo, min(up, found)) if np.isfinite(found) else (mid, up)
        best[i] = up
    return best


def exact_margins(model: MarginNet, x: torch.Tensor, y: torch.Tensor, p: float, limit: float):
    """``(|exact| [n], solved [n] bool, seconds per point)`` by ``mip`` in the box domain."""
    mip = build_estimator("mip", time_limit=limit, domain="box")
    t0 = time.perf_counter()
    values = mip(model, x, y, p=p).abs().numpy()
    seconds = (time.perf_counter() - t0) / len(x)
    solved = np.array([r.status == "exact" and math.isfinite(r.upper) for r in mip.last_details])
    return values, solved, seconds


def report(label: str, model: MarginNet, x: torch.Tensor, y: torch.Tensor, p: float, limit: float) -> None:
    """Print one table: every attack against the exact margins of the points ``mip`` solved."""
    exact, solved, mip_s = exact_margins(model, x, y, p, limit)
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).numpy()
    keep = solved
    results = estimate_margins(model, x, y, [*ATTACKS[p], "best"], p=p)
    dists = {name: r.values.abs().numpy() for name, r in results.items()}
    t0 = time.perf_counter()
    dists["apgd-search"] = apgd_search(model, x, y, p, dists["best"])
    seconds = {name: r.seconds for name, r in results.items()}
    seconds["apgd-search"] = time.perf_counter() - t0
    ref = np.where(correct, exact, 0.0)[keep]
    best_ref = np.where(correct, np.minimum(dists["best"], dists["apgd-search"]), 0.0)[keep]
    print(
        f"\n{label}, p={'inf' if p == math.inf else 2}: {keep.sum()}/{len(x)} points solved exactly "
        f"(mip {mip_s:.1f} s/point), clean accuracy {correct[keep].mean():.2f}"
    )
    head = ("attack", "median", "p90", "within1%", "opt-exact", "opt-best", "s/pt")
    print("{:12s} {:>7s} {:>7s} {:>8s} {:>9s} {:>8s} {:>6s}".format(*head))
    use = keep & correct
    for name, d in dists.items():
        r = d[use] / exact[use]
        d_all = np.where(correct, d, 0.0)[keep]
        print(
            f"{name:12s} {np.median(r):7.3f} {np.quantile(r, 0.9):7.3f} {np.mean(r <= 1.01):8.2f} "
            f"{optimality(d_all, ref):9.3f} {optimality(d_all, best_ref):8.3f} {seconds[name] / len(x):6.2f}"
        )
    assert (dists["best"][use] >= exact[use] * (1 - 1e-4)).all(), "an attack beat the exact margin"


def report_best_known(label: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> None:
    """Where no exact margin is known (CNNs): every attack against the best distance any of them found,
    and the certified lower bound (``crown``) as how far even that reference may be from the truth."""
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).numpy()
    results = estimate_margins(model, x, y, [*ATTACKS[p], "best", "crown"], p=p)
    dists = {name: r.values.abs().numpy() for name, r in results.items() if name != "crown"}
    seconds = {name: r.seconds for name, r in results.items()}
    t0 = time.perf_counter()
    dists["apgd-search"] = apgd_search(model, x, y, p, dists["best"])
    seconds["apgd-search"] = time.perf_counter() - t0
    ref = np.minimum(dists["best"], dists["apgd-search"])
    crown = results["crown"].values.abs().numpy()
    gap = np.median(ref[correct] / crown[correct])
    print(
        f"\n{label}, p={'inf' if p == math.inf else 2}: {len(x)} points, "
        f"clean accuracy {correct.mean():.2f}; "
        f"reference = best found, median reference / certified = {gap:.2f}"
    )
    head = ("attack", "median", "p90", "within1%", "opt-best", "s/pt")
    print("{:12s} {:>7s} {:>7s} {:>8s} {:>8s} {:>6s}".format(*head))
    for name, d in dists.items():
        r = d[correct] / ref[correct]
        d_all, r_all = np.where(correct, d, 0.0), np.where(correct, ref, 0.0)
        print(
            f"{name:12s} {np.median(r):7.3f} {np.quantile(r, 0.9):7.3f} {np.mean(r <= 1.01):8.2f} "
            f"{optimality(d_all, r_all):8.3f} {seconds[name] / len(x):6.2f}"
        )


def load_cnn(run: Path) -> nn.Module:
    """The trained network of a ``train`` run directory (its config names the model and options)."""
    config = read_config(run)
    model = config["model"]
    return load_model(
        model["name"], run / WEIGHTS, num_classes=10, input_shape=(1, 28, 28), options=model.get("options")
    ).model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="test points per model (default 100)")
    ap.add_argument("--norms", default="2,inf", help="comma-separated: 2, inf")
    ap.add_argument("--recipes", default="standard,regularized")
    ap.add_argument("--time-limit", type=float, default=30.0, help="mip seconds per point")
    ap.add_argument("--mnist", action="store_true", help="add the MNIST MLP 784-64-64-10")
    ap.add_argument("--cnn", nargs="*", default=[], type=Path, help="train run directories of MNIST CNNs")
    ap.add_argument("--models", default="digits", help='"digits" (default), or "" for the CNNs only')
    args = ap.parse_args()
    torch.set_num_threads(1)
    norms = [math.inf if s.strip() == "inf" else 2.0 for s in args.norms.split(",")]
    models = [("digits", "digits", [32, 32], 60, None)] if args.models else []
    if args.mnist:
        models.append(("mnist", "mnist", [64, 64], 5, 20000))  # as bench_exact.py
    for data, name, widths, epochs, n_train in models:
        xtr, ytr, xte, yte = load(name, n_train, args.n, 0)
        for recipe in args.recipes.split(","):
            torch.manual_seed(0)
            model = build_model("mlp", widths=widths, input_shape=tuple(xtr.shape[1:]), num_classes=10)
            train(model, xtr, ytr, recipe, epochs, 0.01)  # bench_exact.py's learning rate
            for p in norms:
                report(f"{data} MLP {widths}, {recipe}", model, xte, yte, p, args.time_limit)
    if args.cnn:
        _, _, xte, yte = load("mnist", 100, args.n, 0)
        for run in args.cnn:
            model = load_cnn(run)
            for p in norms:
                report_best_known(f"MNIST-CNN {run.name}", model, xte, yte, p)


if __name__ == "__main__":
    main()
