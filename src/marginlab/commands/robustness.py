"""``marginlab robustness``: robust accuracy of a trained model (any spec of :mod:`marginlab.nets.spec`).

    marginlab robustness --model mnist-mlp --weights model.pt --data mnist --eps 0.5,1,2 --out rob/

writes ``rob/robustness.json`` and ``rob/robustness.png`` (atomically, and only once everything has been
computed, so a bad input or a crash leaves nothing behind). The evaluation is
:func:`marginlab.robustness.robust_accuracy`, with the same defaults as from Python::

    robust_accuracy(model, x, y, [0.5, 1.0])  # certificates, DDN bound pre-pass, AutoAttack on the rest

It prints per eps the band: certified accuracy (CROWN certificates; ``--certify off`` for none) <= robust
accuracy (what survived the attacks) <= clean accuracy, and how many points were decided how.
"""

from __future__ import annotations

import argparse
from typing import Any

from marginlab.base.config import parse_key_values
from marginlab.commands.args import (
    add_model_arguments,
    add_points_arguments,
    check_out_dir,
    int_arg,
    load_from_args,
    parse_names,
    set_threads,
)
from marginlab.lab.names import ROBUSTNESS, ROBUSTNESS_FIGURE, WEIGHTS
from marginlab.lab.outputs import writing_into, written_by
from marginlab.plots.common import save
from marginlab.plots.robustness import plot_robustness
from marginlab.robustness import ATTACKS, RobustnessResult, RobustnessSettings, robust_accuracy
from marginlab.robustness.attacks import parse_eps

EXAMPLE = f"marginlab robustness --model mnist-cnn --weights {WEIGHTS} --data mnist --eps 1,2 --out rob/"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``robustness`` subcommand and its options (defaults from :class:`RobustnessSettings`)."""
    d = RobustnessSettings()
    p = sub.add_parser(
        "robustness",
        help="certified and robust accuracy of a trained model (CROWN, min-norm bound, PGD, AutoAttack)",
        description="Certified and robust accuracy at each radius: certificates (CROWN) set aside the "
        "points robust for sure, a minimum-norm bound pre-pass breaks others, then the fixed-eps attacks "
        "run on the points still undecided; reports the band certified <= robust <= clean and "
        f"sanity-check warnings. Example: {EXAMPLE}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p)
    add_points_arguments(p)
    p.add_argument("--eps", required=True, help="comma-separated radii, e.g. 0.5,1,2")
    p.add_argument("--norm", default=d.norm, help="L2 or Linf (2 and inf accepted)")
    p.add_argument(
        "--attacks", default=",".join(d.attacks), help=f"in order, from: {', '.join(ATTACKS.names())}"
    )
    p.add_argument(
        "--bound",
        default="auto",  # not d.bound: the settings resolve "auto" for their own (L2) norm
        help="min-norm attack for the bound pre-pass ('auto': the norm's default, DDN for L2, FMN for Linf), "
        "or 'none'",
    )
    p.add_argument(
        "--certify",
        default=d.certify,
        help="certified lower bound of the certificate pre-pass: 'auto' (CROWN where bound propagation "
        "supports the model's layers, else none), 'off', or an estimator (crown, lipschitz)",
    )
    p.add_argument(
        "--certify-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="certifier parameter, e.g. --certify-param alpha_steps=20 or domain=rd (default domain: box, "
        "where the attacks search; an R^d certificate is sound too, and looser) (repeatable)",
    )
    p.add_argument("--steps", type=int_arg, default=d.steps, help="PGD steps (the reference: 1000)")
    p.add_argument("--step-size", type=float, default=d.step_size, help="PGD step size")
    p.add_argument("--aa-version", default=d.aa_version, choices=["standard", "plus", "custom"])
    p.add_argument("--aa-attacks", help="with --aa-version custom: e.g. apgd-ce,apgd-t")
    p.add_argument("--aa-eps", help="radii AutoAttack runs at (default: all of --eps)")
    p.add_argument("--out", required=True, help=f"output directory ({ROBUSTNESS}, {ROBUSTNESS_FIGURE})")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``marginlab robustness``: attack the model's points at every ``--eps``, write the result and its
    figure into ``--out``; returns the exit status."""
    # every cheap check first: nothing is loaded or written before the inputs make sense
    eps = parse_eps(args.eps)
    settings = RobustnessSettings(
        norm=args.norm,
        attacks=tuple(parse_names(args.attacks, "attack")),
        bound=args.bound,
        certify=args.certify,
        certify_params=parse_key_values(args.certify_param, "certify parameter", "KEY=VALUE"),
        steps=args.steps,
        step_size=args.step_size,
        seed=args.seed,
        batch_size=args.batch_size,
        aa_version=args.aa_version,
        aa_attacks=(
            tuple(parse_names(args.aa_attacks, "AutoAttack attack")) if args.aa_attacks is not None else None
        ),
        aa_eps=tuple(parse_eps(args.aa_eps)) if args.aa_eps is not None else None,
    )
    settings.check_radii(eps)  # before the data and the model are loaded
    out = check_out_dir(args.out)
    set_threads(args.threads)
    # never over a comparison's robustness.json or into a run directory itself; under its lock inside one
    files = [ROBUSTNESS_FIGURE, ROBUSTNESS]
    with writing_into(out, "robustness", files, anchor=ROBUSTNESS, legacy=is_legacy_result):
        model, data, index, loaded = load_from_args(args)
        result = robust_accuracy(model, data.x, data.y, eps, settings, index=index.tolist())
        title = f"{args.model} on {args.data} ({args.split}, n={result.n})"
        # the figure first, the JSON last: a robustness.json is only ever there with everything before it
        save(plot_robustness(result.margin_upper(), result, title=title), out / ROBUSTNESS_FIGURE)
        result.save(out / ROBUSTNESS, **written_by("robustness"), model=args.model, weights=args.weights,
                    loaded_model=loaded, data=args.data, split=args.split)  # fmt: skip
    for line in band_lines(result):
        print(line)
    for note in result.notes:
        print(f"note: {note}")
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"wrote {out / ROBUSTNESS} and {out / ROBUSTNESS_FIGURE}")
    return 0


def is_legacy_result(raw: dict[str, Any]) -> bool:
    """Whether a ``robustness.json`` without ``written_by`` is ``marginlab robustness``' own: it names
    the model and data it evaluated; a comparison's has ``reference_eps`` instead."""
    return "reference_eps" not in raw and "model" in raw and "data" in raw


def band_lines(result: RobustnessResult) -> list[str]:
    """The console lines of a result: clean accuracy and the certifier, then per eps the band (certified
    <= robust <= clean), the accuracy after each stage and how the points were decided."""
    cert = result.certifier
    by = f"; certificates by {cert['estimator']} ({cert.get('domain') or 'any'} domain)" if cert else ""
    lines = [f"clean accuracy {result.clean_accuracy:.1%} on {result.n} points{by}"]
    for j, e in enumerate(result.eps):
        low = "" if result.certified is None else f"certified {_pct(result.certified[j])} <= "
        stages = ", ".join(f"after {s} {_pct(result.accuracy[s][j])}" for s in result.stages)
        how = ""
        if result.decided is not None:
            shown = {k: v for k, v in result.decided.items() if k != "certified" or result.certified}
            how = "; decided: " + ", ".join(f"{v[j]} {k}" for k, v in shown.items())
        lines.append(
            f"eps={e:g}: {low}robust {_pct(result.worst_case[j])} <= clean {_pct(result.clean_accuracy)} "
            f"({stages}){how}"
        )
    return lines


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"
