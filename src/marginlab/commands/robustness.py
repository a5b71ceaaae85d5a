"""``marginlab robustness``: robust accuracy of a trained model (any spec of :mod:`marginlab.model_io`).

    marginlab robustness --model mnist-mlp --weights model.pt --data mnist --eps 0.5,1,2 --out rob/

writes ``rob/robustness.json`` and ``rob/robustness.png`` (atomically, and only once everything has been
computed, so a bad input or a crash leaves nothing behind). See :func:`marginlab.evaluation.
evaluate_robustness` for how the bound, PGD and AutoAttack are combined; from Python, on any module::

    evaluate_robustness(model, x, y, [0.5, 1.0], norm="L2", bound="ddn")
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from marginlab.errors import ConfigError

DEFAULT_N = 500


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that name a model, its weights and the points to evaluate (shared with ``margins``)."""
    p.add_argument(
        "--model",
        required=True,
        help="a registry name (marginlab.models.MODELS), FILE.py:Class, package.module:factory, "
        "a TorchScript file or an .onnx file (needs marginlab[onnx])",
    )
    p.add_argument(
        "--weights",
        help="a state_dict or checkpoint file (needed for registry models; TorchScript/ONNX hold their own)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option, e.g. --option widths=[256] (repeatable)",
    )
    p.add_argument(
        "--preprocess",
        metavar="mean=M,std=S",
        help="input normalisation folded into the model, e.g. mean=0.1307,std=0.3081 or "
        "mean=0.49,0.48,0.45,std=0.25,0.24,0.26 (attacks and eps stay in [0,1] pixels)",
    )
    p.add_argument(
        "--key-map",
        metavar="OLD=NEW,...",
        help="rename checkpoint key prefixes, e.g. features.=phi.,fc3.=head. (foreign names that pair "
        "up in order with the model's are mapped without it)",
    )
    p.add_argument(
        "--data", required=True, help="dataset spec: mnist, fashion-mnist, cifar10, digits, mnist:0,1"
    )
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split (default test)")
    p.add_argument(
        "--n",
        type=int,
        help=f"points drawn from the split with --seed (default {DEFAULT_N}, or all if fewer)",
    )
    p.add_argument("--all", action="store_true", help="use every point of the split (ignores --n)")
    p.add_argument(
        "--seed", type=seed_arg, default=0, help="seed of the point subset and the attacks (default 0)"
    )
    p.add_argument("--data-dir", help="data directory (default: $MARGINLAB_DATA or ~/.marginlab/data)")
    p.add_argument("--batch-size", type=int_arg, default=256, help="points per batch (default 256)")


def int_arg(text: str) -> int:
    """argparse type: an integer that fits in 64 bits (torch overflows on larger ones, deep inside)."""
    from marginlab.config import INT_LIMIT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -INT_LIMIT < value < INT_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is out of range (integers must lie within +-(2**63 - 1))")
    return value


def seed_arg(text: str) -> int:
    """argparse type: a seed (see :func:`marginlab.seed.check_seed`)."""
    from marginlab.seed import check_seed

    try:
        return check_seed(int_arg(text), "the seed")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["widths=[256]", "dropout=0.5"]`` -> ``{"widths": [256], "dropout": 0.5}`` (values as TOML)."""
    from marginlab.config import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"option {item!r} is not of the form KEY=VALUE")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(model, dataset, index, record)`` from the options of :func:`add_model_arguments`; ``record``
    says what was loaded (:func:`marginlab.model_io.load_model`). User errors: one line."""
    from marginlab import model_io
    from marginlab.evaluation import load_eval_data
    from marginlab.weights import parse_key_map

    # every cheap check first: a bad spec, option or file fails before any data is read
    model_io.resolve_spec(args.model)
    preprocess = model_io.parse_preprocess(args.preprocess)
    key_map = parse_key_map(args.key_map)
    options = parse_options(args.option)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise ConfigError(f"weights file {args.weights} not found")
    n = None if args.all else DEFAULT_N if args.n is None else args.n
    data, index = load_eval_data(
        args.data, args.split, n=n, seed=args.seed, data_dir=args.data_dir, clip=args.n is None
    )
    loaded = model_io.load_model(
        args.model,
        args.weights,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        options=options,
        preprocess=preprocess,
        key_map=key_map,
    )
    return loaded.model, data, index, loaded.record


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("robustness", help="robust accuracy of a trained model under PGD and AutoAttack")
    add_model_arguments(p)
    p.add_argument("--eps", required=True, help="comma-separated radii, e.g. 0.5,1,2")
    p.add_argument("--norm", default="L2", help="L2 or Linf (default L2)")
    p.add_argument("--attacks", default="pgd,autoattack", help="in order; the first runs on every point")
    p.add_argument("--steps", type=int_arg, default=1000, help="PGD steps (default 1000, the reference)")
    p.add_argument("--step-size", type=float, default=0.01, help="PGD step size (default 0.01)")
    p.add_argument("--bound", default="ddn", help="min-norm attack for the bound pre-pass, or 'none'")
    p.add_argument("--aa-version", default="standard", choices=["standard", "plus", "custom"])
    p.add_argument("--aa-attacks", help="with --aa-version custom: e.g. apgd-ce,apgd-t")
    p.add_argument("--out", required=True, help="output directory (robustness.json, robustness.png)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from marginlab.evaluation import evaluate_robustness, parse_eps, parse_names
    from marginlab.fsio import atomic_write_json
    from marginlab.plots.common import save
    from marginlab.robustness import ATTACKS, AttackSettings, normalize_norm

    # every cheap check first: nothing is loaded or written before the inputs make sense
    eps = parse_eps(args.eps)
    norm = normalize_norm(args.norm)
    attacks = parse_names(args.attacks, "attack")
    for name in attacks:
        ATTACKS.get(name)
    bound = None if args.bound.lower() == "none" else args.bound
    aa_attacks = parse_names(args.aa_attacks, "AutoAttack attack") if args.aa_attacks else None
    settings: dict[str, Any] = {
        "steps": args.steps,
        "step_size": args.step_size,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "aa_version": args.aa_version,
        "aa_attacks": tuple(aa_attacks) if aa_attacks else None,
    }
    AttackSettings(norm=norm, **settings)  # the attacks' own checks, made now rather than after the bound
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    model, data, _, loaded = load_from_args(args)
    result = evaluate_robustness(
        model,
        data.x,
        data.y,
        eps,
        norm=norm,
        attacks=attacks,
        bound=bound,
        **settings,
    )
    record = {
        "model": args.model,
        "weights": args.weights,
        "loaded_model": loaded,
        "data": args.data,
        "split": args.split,
        "seed": args.seed,
        **result,
    }
    # the figure first, the JSON last: a robustness.json is only ever there with everything before it
    save(_figure(result, attacks, title=f"{args.model} on {args.data} ({args.split}, n={result['n']})"),
         out / "robustness.png")  # fmt: skip
    atomic_write_json(out / "robustness.json", record)
    first = attacks[0]
    print(f"clean accuracy {result['clean_accuracy']:.1%} on {result['n']} points")
    for j, e in enumerate(eps):
        own = result["accuracy"][first][j]
        print(f"eps={e:g}: {first} {_pct(own)}, worst case {_pct(result['worst_case'][j])}")
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {out / 'robustness.json'} and {out / 'robustness.png'}")
    return 0


def _figure(result: dict[str, Any], attacks: list[str], title: str) -> Any:
    """The robustness figure: bound curve, each attack's accuracy and the worst case."""
    from marginlab.robustness import RobustnessResult, plot_robustness

    ran = [a for a in attacks if a in result["accuracy"]]
    # the evaluation as the robustness module's figure expects it: one stage per attack that ran
    stages = RobustnessResult(
        norm=result["norm"], eps=result["eps"], stages=ran, n=result["n"],
        clean_accuracy=result["clean_accuracy"],
        robust_accuracy={a: [math.nan if v is None else v for v in result["accuracy"][a]] for a in ran},
        worst_case=result["worst_case"], bound_share=result["bound_share"], attacked={}, clean_correct=[],
        robust=[], settings={}, seconds={},
    )  # fmt: skip
    return plot_robustness(result["points"]["margin_upper"], stages, title=title)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"
