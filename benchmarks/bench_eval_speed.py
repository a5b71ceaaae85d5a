"""What the bound pre-pass saves: the default robustness evaluation against AutoAttack alone.

On the briefly trained MNIST-CNN of ``bench_bounds.py`` (weights cached in ``--cache``), ``n`` test points
and the L2 radii ``--eps``, in one process:

(a) ``robust_accuracy(model, x, y, eps)`` with its defaults (certificates, bound pre-pass, then the
    default attacks only on the points neither certified nor broken), and, with ``--variants``, without
    certificates: the pre-pass followed by PGD and AutoAttack (a1) and by AutoAttack only (a2);
(b) ``robust_accuracy(model, x, y, eps, certify="off", bound=None, attacks=("autoattack",))``: the same
    AutoAttack on every correctly classified point.

On MLPs, ``bench_honest_eval.py`` measures (a) against (b) on the models of a comparison run.

Printed: wall and CPU seconds of each, their ratios (a)/(b), the seconds per stage, how many points each
stage attacked, and both robust accuracies (a must be equal or lower: it is at least as strong).
AutoAttack 'standard' is slow on a CPU; ``--aa custom`` runs APGD-CE and APGD-T only (in both).

    python benchmarks/bench_eval_speed.py                        # 200 points, eps 1.5 and 2.0, standard
    python benchmarks/bench_eval_speed.py --n 50 --aa custom --variants
"""

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench_bounds import mnist_points, trained_model
from marginlab.robustness import robust_accuracy


def timed_eval(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: list[float], **kw: Any) -> Any:
    wall, cpu = time.perf_counter(), time.process_time()
    res = robust_accuracy(model, x, y, eps, **kw)
    return res, time.perf_counter() - wall, time.process_time() - cpu


def describe(label: str, res: Any, wall: float, cpu: float) -> None:
    acc = ", ".join(f"{a:.3f}" for a in res.worst_case)
    stages = ", ".join(f"{st} {res.seconds.get(st, 0.0):.0f}s on {res.attacked[st]}" for st in res.stages)
    print(f"{label}: wall {wall:.0f} s, cpu {cpu:.0f} s; robust accuracy [{acc}]; {stages}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="test points (all of them, correct or not)")
    ap.add_argument("--eps", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--aa", choices=["standard", "custom"], default="standard")
    ap.add_argument("--variants", action="store_true", help="also time the pre-pass with and without PGD")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"), help="where trained weights are cached")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = trained_model("cnn", args.cache)
    x, y, acc = mnist_points(model, args.n, correct_only=False)
    aa: dict[str, Any] = {}
    if args.aa == "custom":
        aa = {"aa_version": "custom", "aa_attacks": ("apgd-ce", "apgd-t")}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); MNIST-CNN, test accuracy {acc:.4f}"
    )
    print(f"{len(x)} points, L2, eps {args.eps}, AutoAttack {args.aa} {aa.get('aa_attacks', '')}")
    runs = {
        "(a) defaults": {},
        "(a1) bound, PGD, AutoAttack": {"attacks": ("pgd", "autoattack"), "certify": "off"},
        "(a2) bound, AutoAttack": {"attacks": ("autoattack",), "certify": "off"},
        "(b) AutoAttack alone": {"bound": None, "attacks": ("autoattack",), "certify": "off"},
    }
    if not args.variants:
        del runs["(a1) bound, PGD, AutoAttack"], runs["(a2) bound, AutoAttack"]
    out = {label: timed_eval(model, x, y, args.eps, **kw, **aa) for label, kw in runs.items()}
    for label, (res, wall, cpu) in out.items():
        describe(f"{label} {res.stages}", res, wall, cpu)
    alone, b_wall, b_cpu = out["(b) AutoAttack alone"]
    for label, (_, wall, cpu) in out.items():
        if label.startswith("(a"):
            print(f"{label} / (b): wall {wall / b_wall:.2f}, cpu {cpu / b_cpu:.2f}")
    full = out["(a) defaults"][0]
    weaker = [e for e, a, b in zip(full.eps, full.worst_case, alone.worst_case, strict=True) if a > b]
    print("robust accuracy (a) <= (b) at every eps:", "yes" if not weaker else f"no, at {weaker}")
    for w in dict.fromkeys(w for res, _, _ in out.values() for w in res.warnings):
        print("warning:", w)


if __name__ == "__main__":
    main()
