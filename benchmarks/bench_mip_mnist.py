"""Exact margins (``mip``) at MNIST scale: a 784-64-64-10 ReLU MLP, L-inf (or L2), box domain.

Trains the MLP (seeded: SGD with Nesterov, 5 epochs on 20k MNIST images, the loop of
``benchmarks/bench_exact.py``; cached in ``--cache``), then runs ``mip`` on ``--n`` test points (a seeded
draw) with ``--time-limit`` seconds per point, and prints how many points are exact, the per-point
seconds of the search (median, 90th percentile, worst), the total wall time including the attacks and
crown, and the bracket it closed (median exact/crown and best-attack/exact).

``--variant`` measures what each part of the search brings, on the same points:

- ``search``: the estimator as shipped (radius tests, PGD and region refinement, tuned SCIP);
- ``no-local``: without PGD and the region refinement (SCIP finds every adversarial point);
- ``scip-default``: SCIP's default settings for the radius tests (root cuts, presolving, heuristics);
- ``cuts``: with the ideal ReLU cuts of ``bounds/milp_cuts.py`` at the root;
- ``minnorm``: the former method, one program ``min ||delta||`` per class with big-M bounds over the
  ball of the best radius so far (classes closest first, each cut off at the best radius).

    OMP_NUM_THREADS=1 python benchmarks/bench_mip_mnist.py --n 100 --time-limit 60
    OMP_NUM_THREADS=1 python benchmarks/bench_mip_mnist.py --n 10 --variant minnorm --time-limit 60
    OMP_NUM_THREADS=1 python benchmarks/bench_mip_mnist.py --n 20 --norm 2 --time-limit 60
"""

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from marginlab.bounds.crown import layer_bounds, margin_spec, spec_rows
from marginlab.bounds.domain import InputSet
from marginlab.bounds.milp import MilpProgram, network_blocks
from marginlab.bounds.network import network_graph
from marginlab.data import load_dataset
from marginlab.estimators import build_estimator
from marginlab.estimators.crown import certified_radius
from marginlab.estimators.mip import Mip, PointResult, require_scip
from marginlab.estimators.mip_point import Setup, solve_point
from marginlab.nets.models import MarginNet, build_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_exact import train  # noqa: E402  (a sibling script: the same training loop)


def get_model(cache: Path, epochs: int, n_train: int) -> MarginNet:
    """The 784-64-64-10 MLP: trained once (seed 0) and cached."""
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 28, 28), widths=(64, 64))
    path = cache / f"mnist-mlp-64-64-e{epochs}-n{n_train}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    data = load_dataset("mnist", "train", n=n_train, seed=0)
    seconds = train(model, data.x, data.y, "standard", epochs, 0.01)
    print(f"trained 784-64-64-10 in {seconds:.0f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def run_estimator(model: MarginNet, x: torch.Tensor, y: torch.Tensor, p: float, args) -> list[PointResult]:
    """The shipped estimator, one batch of every point."""
    mip = build_estimator(
        "mip", time_limit=args.time_limit, rtol=args.rtol, batch_size=len(x), jobs=args.jobs
    )
    assert isinstance(mip, Mip)
    mip(model, x, y, p=p)
    return mip.last_details


def run_variant(model: MarginNet, x: torch.Tensor, y: torch.Tensor, p: float, args) -> list[PointResult]:
    """An ablation: the same first steps as the estimator (attack, crown), then per point the variant."""
    graph = network_graph(model, (1, 28, 28))
    with torch.no_grad():
        pred = model(x).argmax(1)
    hint = build_estimator("best", batch_size=len(x))(model, x, y, p=p).abs()
    xd, sign = x.double(), (pred == y).double() * 2 - 1
    lo = certified_radius(graph, xd, y, sign, p=p, box=True, hi=hint, rtol=1e-3)
    model64 = build_model("mlp", input_shape=(1, 28, 28), widths=(64, 64)).double()
    model64.load_state_dict(model.state_dict())
    local, tuned = args.variant != "no-local", args.variant != "scip-default"
    cuts = args.variant == "cuts"
    setup = Setup(graph, network_blocks(graph), model64.eval(), p, True, args.time_limit, args.rtol,
                  require_scip(), local, tuned, cuts)  # fmt: skip
    out = []
    for i in range(len(x)):
        if args.variant == "minnorm":
            out.append(min_norm_point(setup, xd[i], int(y[i]), int(pred[i]), float(lo[i]), float(hint[i])))
        else:
            out.append(solve_point(setup, xd[i], int(y[i]), int(pred[i]), float(lo[i]), float(hint[i])))
    return out


def min_norm_point(setup: Setup, x0: torch.Tensor, y: int, pred: int, lo: float, best: float) -> PointResult:
    """The former method (correctly classified points only): per class, closest first, ``min ||delta||``
    with big-M bounds over the ball of the best radius so far, cut off there."""
    start, programs, lowers = time.perf_counter(), 0, []
    if pred != y:
        return PointResult("unsolved", lo, best, -1, None, False, math.nan, 0.0, 0)
    with torch.no_grad():
        logits = setup.model(x0[None])[0]
    k_all = sorted((k for k in range(10) if k != y), key=lambda k: float(logits[y] - logits[k]))
    best *= 1 + 1e-6
    for k in k_all:
        inset = InputSet(x0.flatten()[None], torch.tensor([best], dtype=torch.float64), setup.p, True)
        bounds = layer_bounds(setup.graph, inset)
        spec = margin_spec(torch.tensor([y]), 10, torch.ones(1))[:, [k - (k > y)]]
        a, d = spec_rows(setup.graph, bounds, spec)
        if bool((inset.concretize(a) + d)[0, 0] > 0):
            lowers.append(best)
            continue
        prog = MilpProgram(setup.scip, setup.blocks, bounds, x0, inset)
        prog.m.addCons(prog.logit_gap(k, y) >= 0)
        prog.objective(setup.p, best)
        left = setup.time_limit - (time.perf_counter() - start)
        status, dual, delta = prog.solve(left, setup.p)
        programs += 1
        if delta is not None:
            best = min(best, float(torch.linalg.vector_norm(delta, ord=setup.p)))
        dual = math.sqrt(max(dual, 0)) if setup.p == 2.0 and math.isfinite(dual) else dual
        lowers.append(best if status in ("optimal", "infeasible") else max(lo, min(dual, best)))
        if time.perf_counter() - start >= setup.time_limit:
            lowers += [lo] * (len(k_all) - len(lowers))
            break
    lower = min(lowers)
    status = "exact" if lower >= best * (1 - 1e-6) else "time limit"
    return PointResult(status, lower, best, -1, None, True, math.nan, time.perf_counter() - start, programs)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (forked workers): the work done, which
    other processes on a shared machine do not inflate as they do the wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def report(
    results: list[PointResult], crown: torch.Tensor, attack: torch.Tensor, total: float, cpu: float
) -> None:
    """The figures of one run."""
    n = len(results)
    secs = sorted(r.seconds for r in results)
    counts = {s: sum(r.status == s for r in results) for s in ("exact", "time limit", "unsolved")}
    exact = [i for i, r in enumerate(results) if r.status == "exact" and math.isfinite(r.upper)]
    p90 = secs[min(n - 1, math.ceil(0.9 * n) - 1)]
    print(f"points {n}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print(
        f"search seconds per point: median {statistics.median(secs):.2f}, p90 {p90:.2f}, max {secs[-1]:.2f}"
    )
    print(f"total wall time (attacks, crown, search): {total / 60:.2f} min ({total / n:.2f} s per point); "
          f"CPU time {cpu / 60:.2f} min")  # fmt: skip
    print(f"programs per point: median {statistics.median(r.programs for r in results)}, "
          f"radius tests: median {statistics.median(r.tests for r in results)}")  # fmt: skip
    if exact:
        ex = torch.tensor([results[i].upper for i in exact])
        print(f"exact points: median exact/crown {float((ex / crown[exact]).median()):.3f}, "
              f"median best-attack/exact {float((attack[exact] / ex).median()):.4f}, "
              f"worst {float((attack[exact] / ex).max()):.4f}")  # fmt: skip
    open_ = [r.upper / r.lower for r in results if r.status != "exact" and r.lower > 0]
    if open_:
        print(f"open points: upper/lower median {statistics.median(open_):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="test points (default 100)")
    ap.add_argument("--norm", default="inf", choices=["inf", "2"])
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per point (default 60)")
    ap.add_argument("--rtol", type=float, default=1e-4, help="exact when upper - lower <= rtol * upper")
    ap.add_argument(
        "--variant", default="search", choices=["search", "no-local", "scip-default", "cuts", "minnorm"]
    )
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--mnist-train", type=int, default=20000)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/marginlab-bench"))
    ap.add_argument("--jobs", type=int, default=1, help="worker processes of the search (default 1)")
    ap.add_argument("--verbose", action="store_true", help="one line per point")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = math.inf if args.norm == "inf" else 2.0
    model = get_model(args.cache, args.epochs, args.mnist_train)
    test = load_dataset("mnist", "test", n=args.n, seed=0)
    x, y = test.x, test.y
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    print(f"MNIST 784-64-64-10, accuracy {acc:.3f} on the {args.n} points; L{args.norm}, box, "
          f"time limit {args.time_limit:g} s, rtol {args.rtol:g}, {args.variant}", flush=True)  # fmt: skip
    crown = build_estimator("crown")(model, x, y, p=p).abs()
    attack = build_estimator("best")(model, x, y, p=p).abs()
    start, cpu = time.perf_counter(), cpu_seconds()
    if args.variant == "search":
        results = run_estimator(model, x, y, p, args)
    else:
        results = run_variant(model, x, y, p, args)
    total, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if args.verbose:
        for i, r in enumerate(results):
            print(f"{i:3d} {r.status:10s} [{r.lower:.6f}, {r.upper:.6f}] {r.seconds:6.2f} s "
                  f"programs {r.programs} tests {r.tests}")  # fmt: skip
    report(results, crown, attack, total, cpu)


if __name__ == "__main__":
    main()
