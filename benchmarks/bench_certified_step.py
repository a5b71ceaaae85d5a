"""The cost of one certified-training step (``ibp``, ``crown-ibp``) relative to a clean cross-entropy step.

Per model and objective: the median wall time of ``objective(...)`` + ``backward()`` on one batch of
random images (the cost does not depend on the data), over ``--reps`` repetitions after two warm-ups,
and its ratio to the clean step (``cross-entropy``, the loss of the ``standard`` recipe). The certified
objectives are timed mid-ramp, where every part of them is computed: ``ibp`` (interval bounds, the last
layer folded in), ``crown-ibp`` with ``beta > 0`` (IBP forward plus CROWN-IBP's backward pass of the
K-1 margin rows) and ``crown-ibp`` after its ramp (``beta = 0``: IBP only).

    python benchmarks/bench_certified_step.py     # MNIST-MLP 784-1024-10 and mnist-cnn, batch 128
    python benchmarks/bench_certified_step.py --threads 2 --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from marginlab.nets.models import build_model
from marginlab.training.certified import CrownIbp, Ibp
from marginlab.training.loop import FeaturesAndLogits
from marginlab.training.objectives import BuildContext, CrossEntropy, Objective, StepInfo


def _time(
    objective: Objective, model: nn.Module, x: torch.Tensor, y: torch.Tensor, at: StepInfo, reps: int
) -> float:
    net = FeaturesAndLogits(model)
    times = []
    for i in range(reps + 2):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        objective(net, model, x, y, at).objective.backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Print the median step time and its ratio to the clean step per model and objective."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="mnist-mlp,mnist-cnn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ctx = BuildContext(dataset="mnist")
    mid = StepInfo(0, 20, 100, 1)  # 20% of the run: both ramps are under way
    after = StepInfo(0, 99, 100, 1)
    cases: list[tuple[str, Objective, StepInfo]] = [
        ("cross-entropy", CrossEntropy(), mid),
        ("ibp (mid-ramp)", Ibp.build(Ibp.resolve_params({}, ctx), ctx), mid),
        ("crown-ibp (mid-ramp, beta>0)", CrownIbp.build(CrownIbp.resolve_params({}, ctx), ctx), mid),
        ("crown-ibp (after ramp, beta=0)", CrownIbp.build(CrownIbp.resolve_params({}, ctx), ctx), after),
    ]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    print(f"batch {args.batch}, {args.threads} thread(s), median of {args.reps} steps (forward + backward)")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name)
        base = 0.0
        for label, objective, at in cases:
            t = _time(objective, model, x, y, at, args.reps)
            base = base or t
            print(f"{name:10s} {label:32s} {t * 1e3:8.1f} ms  {t / base:5.2f}x")


if __name__ == "__main__":
    main()
