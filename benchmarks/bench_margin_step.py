"""Cost of one training step of ``mma`` and ``large-margin`` against a clean cross-entropy step.

MNIST-MLP (784-1024-10), batch 128 of seeded uniform images in [0, 1] (no dataset needed), labelled by
the model itself with its head scaled x50, so that 92% of the points are correct by MMA's soft logit
margin and MMA searches them, as on a trained model; one thread; a step is the objective's forward,
``backward`` and an SGD update.
Each objective uses its MNIST reference parameters (``resolve_params`` with ``dataset="mnist"``) plus the
variants named below. Printed: the median wall-clock seconds per step over ``--repeats`` steps (after one
warm-up) and the ratio to the clean step.

    python benchmarks/bench_margin_step.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from marginlab.nets.models import build_model
from marginlab.training.large_margin import LargeMargin
from marginlab.training.loop import FeaturesAndLogits
from marginlab.training.mma import MMA, soft_logit_margin
from marginlab.training.objectives import OBJECTIVES, BuildContext, StepInfo

VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("clean CE", "cross-entropy", {}),
    ("mma Linf (40 PGD steps)", MMA.name, {"norm": "Linf"}),
    ("mma L2 (40 PGD steps)", MMA.name, {"norm": "L2"}),
    ("large-margin (approximate)", LargeMargin.name, {}),
    ("large-margin (double backprop)", LargeMargin.name, {"approximate": False}),
    ("large-margin input only", LargeMargin.name, {"layers": "input"}),
]


def step_seconds(objective: str, params: dict[str, Any], repeats: int) -> float:
    """Median seconds of one step of ``objective`` with ``params`` (after one warm-up step)."""
    torch.manual_seed(0)
    model = build_model("mnist-mlp", num_classes=10, input_shape=(1, 28, 28))
    net = FeaturesAndLogits(model)
    ctx = BuildContext(dataset="mnist", model_name="mnist-mlp", seed=0)
    cls = OBJECTIVES.get(objective)
    obj = cls.build(cls.resolve_params(params, ctx), ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(128, 1, 28, 28, generator=gen)
    with torch.no_grad():  # a confident model labelling its own points: MMA searches the whole batch
        model.head.weight.mul_(50)
        y = model(x).argmax(1)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = obj(net, model, x, y, StepInfo(0, i, 1, 1))
        opt.zero_grad(set_to_none=True)
        out.objective.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def correct_share() -> float:
    """Share of the benchmark batch that MMA counts as correct (soft logit margin < 0)."""
    torch.manual_seed(0)
    model = build_model("mnist-mlp", num_classes=10, input_shape=(1, 28, 28))
    x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.head.weight.mul_(50)
        logits = model(x)
    return float((soft_logit_margin(logits, logits.argmax(1)) < 0).float().mean())


def main() -> None:
    """Print seconds per step and the ratio to the clean step for every variant."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [(label, step_seconds(name, params, args.repeats)) for label, name, params in VARIANTS]
    print(f"MMA searched {correct_share():.0%} of the batch")
    base = rows[0][1]
    print(f"MNIST-MLP 784-1024-10, batch 128, {args.threads} thread(s), median of {args.repeats} steps")
    print(f"{'objective':<34}{'s/step':>10}{'x clean':>9}")
    for label, sec in rows:
        print(f"{label:<34}{sec:>10.4f}{sec / base:>9.1f}")


if __name__ == "__main__":
    main()
