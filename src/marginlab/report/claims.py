"""The claims a run checks, read from its ``summary.json``: what each claim says, whether it held, and the
numbers behind the verdict. A report opens with these, because they are what a reader came for.

Each experiment kind writes its verdicts under its own keys:

- ``train`` (deep nets): ``margins.<estimator>.<split>`` with ``first``/``last``/``peak_mean`` records and
  the booleans ``min_margin_rises``, ``mean_margin_falls`` (see :mod:`marginlab.training.trends`);
- ``logreg-gd``: ``<split>_min_margin_rises``, ``<split>_mean_margin_falls``, ``<split>_error_never_rises``
  with their ``_first``/``_last`` numbers, the SVM margins, the cosines and ``shows_tradeoff``;
- ``compare``: ``bases.<base>.vs_standard.<recipe>`` with ``comparable``, ``mean_margin`` and the paired
  ``robust_accuracy`` per radius.

A summary whose structure is not recognised (an older or newer experiment) still contributes its
``findings`` sentences, shown as stated, without a verdict of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from marginlab.core.stats import ci_over_seeds
from marginlab.experiments.logreg_gd import error_rises

HOLDS, FAILS, NOT_COMPARED, STATED = "holds", "does not hold", "not compared", "as stated"
SPLIT_NAMES = {"train": "Train set", "test": "Test set"}


@dataclass(frozen=True)
class Claim:
    """One checked statement: ``verdict`` (one of the constants above), the claim, and its numbers."""

    verdict: str
    text: str
    evidence: str = ""


def claims_of(summary: dict[str, Any], kind: str, metrics: Sequence[Mapping[str, Any]] = ()) -> list[Claim]:
    """The checked claims of one finished run (empty when the summary holds none); ``metrics`` (the
    run's records, when at hand) let a failed check show where it failed."""
    reader = _READERS.get(kind)
    try:
        claims = reader(summary, metrics) if reader is not None else []
    except (KeyError, TypeError, ValueError, StopIteration):
        claims = []  # a summary of another shape: fall back to its sentences
    if claims:
        return claims
    findings = summary.get("findings")
    if isinstance(findings, list):
        return [Claim(STATED, str(f)) for f in findings]
    return []


def verdict(value: object) -> str:
    """The word for a summary's boolean check: holds (True), fails (False), not compared (anything else)."""
    return HOLDS if value is True else FAILS if value is False else NOT_COMPARED


def num(value: object, fmt: str = ".4g") -> str:
    """A number for a sentence (``–`` when missing)."""
    return "–" if not isinstance(value, int | float) or isinstance(value, bool) else format(value, fmt)


def conjunction(checks: Sequence[Claim]) -> str:
    """The verdict of a headline that claims every one of ``checks``: holds only when each holds, fails
    when any fails, else not compared (a headline never holds over a check that does not)."""
    verdicts = [c.verdict for c in checks if c.verdict != STATED]
    if FAILS in verdicts:
        return FAILS
    return HOLDS if verdicts and all(v == HOLDS for v in verdicts) else NOT_COMPARED


def headline(text: str, evidence: str, checks: Sequence[Claim]) -> Claim:
    """A claim that stands for all of ``checks`` (listed under it): its verdict is their
    :func:`conjunction`, and its evidence names the checks that do not hold."""
    v = conjunction(checks)
    failed = [c.text for c in checks if c.verdict == FAILS]
    if failed:
        evidence += f"; {len(failed)} of {len(checks)} do not hold: " + "; ".join(failed)
    return Claim(v, text, evidence)


# -- train (deep nets) ---------------------------------------------------------------------------------
def _train(summary: dict[str, Any], metrics: Sequence[Mapping[str, Any]]) -> list[Claim]:
    claims = []
    for name, entry in summary["margins"].items():
        kind = entry.get("kind", "kind unknown")
        for split, label in SPLIT_NAMES.items():
            t = entry.get(split)
            if not isinstance(t, dict):
                continue
            first, last, peak = t["first"], t["last"], t["peak_mean"]
            where = f"{label}, {name} margin ({kind})"
            epochs = f"epochs {first['epoch']} → {last['epoch']}"
            claims.append(
                Claim(
                    verdict(t["min_margin_rises"]),
                    f"{where}: the minimum margin rises",
                    f"{num(first['min'])} → {num(last['min'])}, {epochs}",
                )
            )
            evidence = f"{num(first['mean'])} → {num(last['mean'])}, {epochs}"
            if t["mean_margin_falls"] is False and t.get("mean_margin_falls_after_peak"):
                evidence += f"; it peaked at epoch {peak['epoch']} ({num(peak['mean'])}) and fell after"
            if isinstance(t.get("share_closer"), int | float):
                evidence += f"; {100 * t['share_closer']:.0f}% of the points moved closer to the boundary"
            claims.append(Claim(verdict(t["mean_margin_falls"]), f"{where}: the mean margin falls", evidence))
    return claims


# -- logreg-gd -----------------------------------------------------------------------------------------
def _logreg(s: dict[str, Any], metrics: Sequence[Mapping[str, Any]]) -> list[Claim]:
    epochs = f"epochs {s['first_epoch']} → {s['last_epoch']}"
    checks = []
    for split, label in SPLIT_NAMES.items():
        if f"{split}_min_margin_rises" not in s:
            continue
        where = f"{label}, exact L2 margin"
        checks.append(
            Claim(
                verdict(s[f"{split}_min_margin_rises"]),
                f"{where}: the minimum margin rises toward the SVM's",
                f"{num(s[f'{split}_min_margin_first'])} → {num(s[f'{split}_min_margin_last'])} (SVM margin "
                f"{num(s.get('svm_margin'))}, GD's limit {num(s.get('svm_reg_margin'))}), {epochs}",
            )
        )
        evidence = f"{num(s[f'{split}_mean_margin_first'])} → {num(s[f'{split}_mean_margin_last'])}, {epochs}"
        every = s.get(f"{split}_mean_margin_falls_every_record")
        if isinstance(every, bool):
            evidence += "; it falls at every record" if every else "; not at every record"
        checks.append(
            Claim(verdict(s[f"{split}_mean_margin_falls"]), f"{where}: the mean margin falls", evidence)
        )
        if f"{split}_error_never_rises" in s:
            checks.append(_error_claim(s, split, label, metrics))
    for key, label in (
        ("cos_svm", "classical SVM"),
        ("cos_svm_reg", "bias-penalised SVM (GD's limit in direction)"),
    ):
        if f"{key}_first" in s:
            first, last = s[f"{key}_first"], s[f"{key}_last"]
            checks.append(
                Claim(
                    verdict(last > first),
                    f"(w, b) turns toward the {label}",
                    f"cosine {num(first)} → {num(last)}",
                )
            )
    # The headline claims every check listed under it: its verdict is their conjunction, never the
    # summary's own flag alone (which leaves some of them out).
    top = headline(
        "Gradient descent shows the trade-off: on train and test the minimum margin rises, the mean "
        "margin falls, the error never rises and (w, b) turns toward the SVMs' direction",
        f"{epochs}; every check below must hold",
        checks,
    )
    if s.get("shows_tradeoff") is False and top.verdict == HOLDS:  # a check the report does not list
        top = replace(top, verdict=FAILS, evidence=f"{top.evidence}; the run's own check says it does not")
    return [top, *checks]


def _error_claim(s: dict[str, Any], split: str, label: str, metrics: Sequence[Mapping[str, Any]]) -> Claim:
    """The claim that the error of ``split`` never rises, with its first and last error and, when it did
    rise, where (from ``metrics``; the summary holds only first and last)."""
    evidence = f"{num(s[f'{split}_error_first'], '.2%')} → {num(s[f'{split}_error_last'], '.2%')}"
    held = s[f"{split}_error_never_rises"]
    if held is False:
        rises = error_rises(metrics, "train" if split == "train" else "test")  # the Literal error_rises takes
        if rises:
            shown = "; ".join(
                f"epoch {e0} → {e1}: {num(a, '.2%')} → {num(b, '.2%')}" for e0, e1, a, b in rises[:3]
            )
            more = f" (and {len(rises) - 3} more)" if len(rises) > 3 else ""
            evidence += f"; it rose {len(rises)} time{'s' if len(rises) > 1 else ''}: {shown}{more}"
        else:
            evidence += "; it rose between two records (its metrics are not at hand to say where)"
    return Claim(
        verdict(held), f"{label}: the error never rises (the fall is no overfitting artefact)", evidence
    )


# -- compare -------------------------------------------------------------------------------------------
def _compare(summary: dict[str, Any], metrics: Sequence[Mapping[str, Any]]) -> list[Claim]:
    claims = []
    for base, entry in summary["bases"].items():
        for recipe, v in (entry.get("vs_standard") or {}).items():
            claims += _versus(base, recipe, v)
            claims += _cost(base, recipe, v.get("time") or {})
        for name, v in (entry.get("ablations") or {}).items():
            recipe = name.split(" vs ", 1)[0]
            claims += _versus(f"{base}, ablation ({v.get('question', name)})", recipe, v)
        claims += _ranking(base, entry.get("ranking") or {}, entry.get("eps_ref"))
    return claims


def _versus(base: str, recipe: str, v: dict[str, Any]) -> list[Claim]:
    """The claims of one pair: ``recipe`` against the entry's baseline (``standard`` unless named)."""
    b = v.get("baseline", "standard")
    mm, acc = v["mean_margin"], v["robust_accuracy"]
    over = "" if b == "standard" else f" over {b}"  # the wording of the claims against standard, as before
    claims = []
    if not v["comparable"]:
        ca = v["clean_accuracy"]
        claims.append(
            Claim(
                FAILS,
                f"{base}: {recipe} trains as well as {b} (else nothing below compares)",
                f"clean accuracy {num(ca.get(b), '.1%')} ({b}) vs {num(ca.get(recipe), '.1%')}",
            )
        )
    beats = v.get("beats_standard", v.get("beats", {}))

    def ruled(key: str) -> str:
        return verdict(beats.get(key)) if v["comparable"] else NOT_COMPARED

    seeds = mm.get("ci") is not None  # two or more seeds: the verdict rests on the interval over seeds
    claims.append(
        Claim(
            ruled("mean_margin_beyond_noise" if seeds else "mean_margin"),
            f"{base}: {recipe} raises the test mean margin over {b}"
            + (" beyond the noise over seeds" if seeds else ""),
            f"{num(mm.get(b))} ({b}) → {num(mm.get(recipe))}" + _interval(mm, ".3g"),
        )
    )
    if "point_margin" in v:
        pm, pts = v["point_margin"], v["point_margin"]["over_points"]
        claims.append(
            Claim(
                ruled("point_margin"),
                f"{base}: {recipe} raises the mean margin upper bound of the fixed test points over {b} "
                "beyond the noise over points",
                f"{num(pm.get(b))} ({b}) → {num(pm.get(recipe))} over {pts.get('points')} paired points"
                + (f"; {ci_over_seeds(pts, '+.3g')}" if pts.get("ci") else ""),
            )
        )
    for key, what, entries in (
        ("robust_accuracy", "worst-case robust", acc),
        ("certified_accuracy", "certified", v.get("certified_accuracy")),
    ):
        if not entries:
            continue
        r = next(e for e in entries if e["reference"])
        claims.append(
            Claim(
                ruled(key),
                f"{base}: {recipe} raises the {what} accuracy at ε = {r['eps']:g}{over} beyond the noise",
                f"{num(r.get(b), '.1%')} ({b}) → {num(r.get(recipe), '.1%')}; paired noise "
                f"over test points (2 s.e.) {num(r.get('noise_2se'), '.1%')}"
                + _interval(r.get("over_seeds") or {}, "+.1%"),
            )
        )
    return claims


def _cost(base: str, recipe: str, cost: dict[str, Any]) -> list[Claim]:
    """The training cost against ``standard``, as measured (no verdict)."""
    claims = []
    for what, label in (("wall", "wall-clock"), ("cpu", "CPU")):
        c = cost.get(what) or {}
        if c.get("ratio") is None:
            continue
        ci = c.get("ci")
        claims.append(
            Claim(
                STATED,
                f"{base}: {recipe} costs {c['ratio']:.2f}x standard's {label} training time",
                f"{num(c['seconds'][0], '.3g')} s → {num(c['seconds'][1], '.3g')} s"
                + (f"; 95% CI over {c['seeds']} seeds [{ci[0]:.2f}x, {ci[1]:.2f}x]" if ci else ""),
            )
        )
    return claims


def _ranking(base: str, ranking: dict[str, Any], eps: object) -> list[Claim]:
    """Which recipe is highest on robust and certified accuracy and on the fixed points' mean margin."""
    words = {
        "robust_accuracy": (f"worst-case robust accuracy at ε = {num(eps, 'g')}", ".1%"),
        "certified_accuracy": (f"certified accuracy at ε = {num(eps, 'g')}", ".1%"),
        "point_mean_margin": ("mean margin upper bound of the fixed test points", ".3g"),
    }
    claims = []
    for key, (label, fmt) in words.items():
        order = ranking.get(key) or []
        if len(order) >= 2:
            top = [r for r, v in order if v == order[0][1]]
            who = f"{top[0]} has" if len(top) == 1 else f"{', '.join(top)} ({len(top)} tied) have"
            text = [f"{order[0][0]} {num(order[0][1], fmt)}"]
            pairs = zip(order, order[1:], strict=False)
            text += [f"{'=' if v == b else '>'} {r} {num(v, fmt)}" for (_, b), (r, v) in pairs]
            claims.append(Claim(STATED, f"{base}: {who} the highest {label}", " ".join(text)))
    return claims


def _interval(d: dict[str, Any], fmt: str) -> str:
    """``; paired 95% CI of the difference [lo, hi] over 3 seeds`` where there is one."""
    text = ci_over_seeds(d, fmt)
    return f"; {text} over {d['seeds']} seeds" if text else ""


_READERS: dict[str, Callable[[dict[str, Any], Sequence[Mapping[str, Any]]], list[Claim]]] = {
    "train": _train,
    "logreg-gd": _logreg,
    "compare": _compare,
}
