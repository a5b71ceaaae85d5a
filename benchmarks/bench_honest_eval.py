"""Honest evaluation against AutoAttack alone: what certificates and the min-norm pre-pass save.

On the MNIST-MLPs of a comparison run (``--runs``: sub-run directories with ``config.json`` and
``model.pt``, e.g. ``runs/compare-quick/runs/mnist-mlp/regularized-seed0`` after
``marginlab run configs/compare-quick.toml --out runs/compare-quick``), ``n`` fixed test points (all of
them, correct or not) and the L2 radii ``--eps``, each repeated ``--repeats`` times in one process:

(a) ``robust_accuracy(model, x, y, eps)``: the honest default, certificates (CROWN, box) → DDN pre-pass →
    AutoAttack on the points neither certified nor broken;
(a0) with ``--variants``: the same without certificates (``certify="off"``; the default before);
(b) ``robust_accuracy(model, x, y, eps, certify="off", bound=None)``: the same AutoAttack on every
    correctly classified point.

Printed per model: median wall and CPU seconds of each (and their spread over the repeats), the ratio of
the medians (a)/(b) and (a0)/(b), robust accuracy of each (a must be equal or lower: it is at least as
strong), the certified accuracy beside it, how the points were decided at each ε, and the seconds per
stage. ``--aa custom`` (the default, as the quick presets) runs APGD-CE and APGD-T with ``--aa-iters``
iterations; ``--aa standard`` the full AutoAttack (slow on a CPU).

    OMP_NUM_THREADS=1 python benchmarks/bench_honest_eval.py --runs DIR [DIR...] --n 100 --repeats 3
    ... --aa standard --certify-param domain=rd      # the full AutoAttack; certificates over R^d
"""

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from marginlab.base.config import parse_key_values
from marginlab.experiments.compare import load_subrun
from marginlab.robustness import RobustnessResult, robust_accuracy

RUNS = {
    "(a) certify, DDN, AutoAttack": {},
    "(a0) DDN, AutoAttack": {"certify": "off"},
    "(b) AutoAttack alone": {"certify": "off", "bound": None},
}


def load(run: Path, n: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model of a sub-run directory and ``n`` fixed test points of its dataset."""
    model, test, _ = load_subrun(run, n, seed)
    return model, test.x, test.y


def timed(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: list[float], **kw: Any) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    res = robust_accuracy(model, x, y, eps, **kw)
    return res, time.perf_counter() - wall, time.process_time() - cpu


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s [{min(values):.1f}-{max(values):.1f}]"


def describe(label: str, res: RobustnessResult, walls: list[float], cpus: list[float]) -> None:
    acc = ", ".join(f"{a:.2f}" for a in res.worst_case)
    cert = "" if res.certified is None else f"; certified [{', '.join(f'{c:.2f}' for c in res.certified)}]"
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items())
    print(f"  {label}: wall {spread(walls)}, cpu {spread(cpus)}; robust [{acc}]{cert}; {secs}")
    if res.decided is not None and res.certified is not None:
        print(f"      decided per eps: {res.decided}; attacked per stage: {res.attacked}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="sub-run directories (model.pt)")
    ap.add_argument("--n", type=int, default=100, help="fixed test points (seed 0, as compare does)")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    ap.add_argument("--aa", choices=["standard", "custom"], default="custom")
    ap.add_argument("--aa-iters", type=int, default=20, help="iterations of the custom AutoAttack")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", action="store_true", help="also (a0): no certificates")
    ap.add_argument("--certify-param", nargs="*", default=[], help="of (a)'s certifier, e.g. domain=rd")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    aa: dict[str, Any] = {"attacks": ("autoattack",)}
    if args.aa == "custom":
        aa |= {"aa_version": "custom", "aa_attacks": ("apgd-ce", "apgd-t"), "aa_iters": args.aa_iters}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); L2, eps {args.eps}; AutoAttack {aa}"
    )
    for run in args.runs:
        model, x, y = load(run, args.n, 0)
        print(f"{run} ({len(x)} points)")
        runs = {k: v for k, v in RUNS.items() if args.variants or not k.startswith("(a0)")}
        runs[next(iter(RUNS))] = {"certify_params": parse_key_values(args.certify_param, "certify parameter")}
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in runs}
        results: dict[str, RobustnessResult] = {}
        for _ in range(args.repeats):
            for label, kw in runs.items():  # interleaved: drifts in machine load hit every variant alike
                res, wall, cpu = timed(model, x, y, args.eps, **aa, **kw)
                results[label] = res
                times[label][0].append(wall)
                times[label][1].append(cpu)
        for label, res in results.items():
            describe(label, res, *times[label])
        b_wall, b_cpu = (statistics.median(v) for v in times["(b) AutoAttack alone"])
        for label in [k for k in runs if k.startswith("(a")]:
            wall, cpu = (statistics.median(v) for v in times[label])
            per = [w / bw for w, bw in zip(times[label][0], times["(b) AutoAttack alone"][0], strict=True)]
            print(f"  {label} / (b): wall {wall / b_wall:.2f} (per repeat {min(per):.2f}-{max(per):.2f}), "
                  f"cpu {cpu / b_cpu:.2f}")  # fmt: skip
        honest, alone = results["(a) certify, DDN, AutoAttack"], results["(b) AutoAttack alone"]
        higher = [e for e, a, b in zip(honest.eps, honest.worst_case, alone.worst_case, strict=True) if a > b]
        print("  robust accuracy (a) <= (b) at every eps:", "yes" if not higher else f"no, at {higher}")
        for w in dict.fromkeys(w for r in results.values() for w in r.warnings):
            print("  warning:", w)


if __name__ == "__main__":
    main()
