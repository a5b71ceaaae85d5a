"""Evaluate a trained model: load a named architecture with its weights and a seeded data subset, and
measure its robustness as the worst case of a minimum-norm bound and a cascade of fixed-ε attacks.

Used by ``marginlab robustness``, ``marginlab margins`` and the ``compare`` experiment. For any
``nn.Module`` that maps images ``[N, C, H, W]`` in [0, 1] to logits ``[N, K]``, the Python API is::

    from marginlab.estimators import estimate_margins
    from marginlab.evaluation import evaluate_robustness
    margins = estimate_margins(model, x, y, ["first-order", "ddn", "best"], p=2)   # {name: [N]}
    report = evaluate_robustness(model, x, y, [0.5, 1.0, 2.0], norm="L2", bound="ddn")

How :func:`evaluate_robustness` spends its attacks (docs/reference-settings.md): one min-norm pass (``bound``)
gives each point an upper bound on its margin; the *first* attack (PGD by default) then runs on every
clean-correct point, so its robust accuracy is its own figure (comparable with the reference's); each
later attack (AutoAttack) runs only on the points that neither the bound nor an earlier attack broke.
A point broken at ε stays broken at every larger ε (its adversarial example lies in the larger ball).
The reported robust accuracy (``worst_case``) is the share of points that survived everything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from marginlab.errors import ConfigError

__all__ = [
    "evaluate_robustness",
    "load_eval_data",
    "load_model",
    "margin_upper_from_json",
    "paired_difference",
    "parse_eps",
    "parse_names",
]


def parse_names(text: str, what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (duplicates dropped, order kept); empty lists are an error."""
    names = list(dict.fromkeys(s.strip() for s in str(text).split(",") if s.strip()))
    if not names:
        raise ConfigError(f"give at least one {what} (a comma-separated list)")
    return names


def parse_eps(text: str | Sequence[float]) -> list[float]:
    """``"0.5,1,2"`` (or a list) -> sorted distinct radii; NaN, inf, negatives and junk are errors."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[float] = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"bad eps value {str(item).strip()!r}; give numbers like 0.5,1,2") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"eps values must be finite and >= 0, got {str(item).strip()!r}")
        out.append(value)
    if not out:
        raise ConfigError("give at least one eps value, e.g. --eps 0.5,1,2")
    return sorted(set(out))


def load_eval_data(
    spec: str,
    split: str = "test",
    *,
    n: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    clip: bool = False,
) -> tuple[Any, torch.Tensor]:
    """A seeded subset of ``n`` points (all for ``None``) of ``split`` and their indices in the split;
    with ``clip``, an ``n`` larger than the split takes every point (else it is an error).

    Returns ``(dataset, index [n])``: a :class:`marginlab.data.Dataset` with ``x [n, C, H, W]`` in [0, 1]
    and ``y [n]``; the same points as ``load_dataset(spec, split, n=n, seed=seed)``.
    """
    import dataclasses

    from marginlab.data import load_dataset
    from marginlab.data.subsets import subsample

    if n is not None and n < 1:
        raise ConfigError(f"the number of points must be positive, got {n}")
    full = load_dataset(spec, split, data_dir=data_dir)
    if clip and n is not None and n >= len(full):
        n = None
    chosen = subsample(len(full), n, seed, f"the {split} split of {spec!r}")
    if chosen is None:
        return full, torch.arange(len(full))
    index = torch.from_numpy(chosen).long()
    return dataclasses.replace(full, x=full.x[index], y=full.y[index]), index


def load_model(
    name: str,
    weights: str | Path | None,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """The model ``name`` (any spec of :mod:`marginlab.model_io`: a registry name, ``FILE.py:Class``, a
    TorchScript or ONNX file) with ``weights`` loaded, in eval mode; user errors: one-line ConfigError.
    :func:`marginlab.model_io.load_model` also takes preprocessing and key maps and records the load."""
    from marginlab import model_io

    return model_io.load_model(
        name, weights, num_classes=num_classes, input_shape=input_shape, options=options
    ).model


def evaluate_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Sequence[float],
    *,
    norm: str = "L2",
    attacks: Sequence[str] = ("pgd", "autoattack"),
    bound: str | None = "ddn",
    bound_params: dict[str, Any] | None = None,
    steps: int = 1000,
    step_size: float = 0.01,
    seed: int = 0,
    batch_size: int = 256,
    aa_version: str = "standard",
    aa_attacks: Sequence[str] | None = None,
    aa_iters: int | None = None,
    aa_eps: Sequence[float] | None = None,
    tol: float = 0.02,
) -> dict[str, Any]:
    """Robust accuracy of ``model`` on ``x [N, C, H, W]`` in [0, 1], ``y [N]`` at each ε (see the module doc).

    ``bound``: a minimum-norm estimator (``ddn``, ``deepfool``, ``fmn``, ``fab``, ``best``; ``None`` = no
    pre-pass) with its keyword ``bound_params``. ``aa_eps``: the radii AutoAttack runs at (``None`` = all).
    Returns a JSON-able dict:
    ``accuracy[attack]`` (the first attack's own figure; for later ones, after everything before them),
    ``bound_share`` (share of points whose bound exceeds ε: an upper bound on robust accuracy),
    ``worst_case`` (the reported figure), ``warnings``, and per point (``points``): label, correctness,
    the bound ``margin_upper`` and the worst-case ``robust`` flags per ε.
    """
    from marginlab.estimators import ESTIMATORS, MarginKind, estimate_margins
    from marginlab.robustness import robust_accuracy
    from marginlab.robustness.attacks import normalize_norm

    norm = normalize_norm(norm)
    eps_list = parse_eps(list(eps))
    attacks = list(dict.fromkeys(attacks))
    if not attacks:
        raise ConfigError("name at least one attack (pgd, autoattack)")
    p = 2 if norm == "L2" else "inf"
    y = y.to(torch.long)
    t0 = time.perf_counter()
    upper = None
    if bound is not None:
        if ESTIMATORS.get(bound).kind is not MarginKind.UPPER:
            raise ConfigError(
                f"--bound {bound!r} is not a minimum-norm attack; use ddn, deepfool, fmn, fab or best"
            )
        params = {bound: dict(bound_params)} if bound_params else None
        upper = estimate_margins(model, x, y, [bound], p=p, batch_size=batch_size, params=params)[bound]
    bound_seconds = time.perf_counter() - t0
    # tightest known upper bound on each point's margin; a break at ε by any attack lowers it to ε
    known = upper.clone() if upper is not None else torch.full((len(y),), math.inf, dtype=torch.float64)
    common = dict(
        norm=norm,
        steps=steps,
        step_size=step_size,
        seed=seed,
        batch_size=batch_size,
        aa_version=aa_version,
        aa_attacks=aa_attacks,
        aa_iters=aa_iters,
        disagreement_tol=tol,
    )
    accuracy: dict[str, list[float | None]] = {}
    attacked: dict[str, list[int | None]] = {}
    seconds = {"bound": bound_seconds}
    warnings: list[str] = []
    correct = _clean_correct(model, x, y, batch_size)
    for i, name in enumerate(attacks):
        run_eps = eps_list
        if name == "autoattack" and aa_eps is not None:
            wanted = parse_eps(list(aa_eps))
            run_eps = [e for e in eps_list if any(math.isclose(e, w) for w in wanted)]
        if not run_eps:
            continue
        first = i == 0
        res = robust_accuracy(
            model,
            x,
            y,
            run_eps,
            attacks=(name,),
            chain_eps=True,
            skip_bound_broken=not first,
            margin_upper=None if (first and upper is None) else (upper if first else known),
            **common,
        )
        for j, e in enumerate(res.eps):
            broken = correct & ~torch.tensor(res.robust[j])
            known[broken] = torch.minimum(known[broken], torch.tensor(e, dtype=torch.float64))
        # float64 shares from the per-point flags (the evaluator's own figures are float32)
        by_eps = {e: float(np.mean(row)) for e, row in zip(res.eps, res.robust, strict=True)}
        n_att = dict(zip(res.eps, res.attacked[name], strict=True))
        accuracy[name] = [by_eps.get(e) for e in eps_list]
        attacked[name] = [n_att.get(e) for e in eps_list]
        seconds[name] = res.seconds[name]
        warnings += [w for w in res.warnings if w not in warnings]
    worst = [float((correct & (known > e)).double().mean()) for e in eps_list]
    warnings += _disagreements(attacks[0], eps_list, accuracy.get(attacks[0], []), worst, tol)
    share = None if upper is None else [float((correct & (upper > e)).double().mean()) for e in eps_list]
    return {
        "norm": norm,
        "eps": eps_list,
        "n": len(y),
        "clean_accuracy": float(correct.double().mean()),
        "bound": None if bound is None else {"estimator": bound, "kind": "upper bound"},
        "bound_share": share,
        "accuracy": accuracy,
        "attacked": attacked,
        "worst_case": worst,
        "settings": {
            **common,
            "attacks": attacks,
            "bound": bound,
            "bound_params": bound_params,
            "aa_eps": aa_eps,
        },
        "seconds": seconds,
        "warnings": warnings,
        "points": {
            "label": y.tolist(),
            "correct": correct.tolist(),
            "margin_upper": None if upper is None else upper.tolist(),
            "robust": [(correct & (known > e)).tolist() for e in eps_list],  # [len(eps)][N], worst case
        },
    }


def margin_upper_from_json(points: dict[str, Any]) -> np.ndarray | None:
    """The per-point bounds ``[N]`` of a saved :func:`evaluate_robustness` result (``points``), with the
    infinities JSON could not hold restored: no adversarial example found is ``+inf`` for a correctly
    classified point and ``-inf`` for a misclassified one."""
    raw = points.get("margin_upper")
    if raw is None:
        return None
    correct = np.asarray(points["correct"], dtype=bool)
    values = np.array([np.nan if v is None else v for v in raw], dtype=np.float64)
    return np.where(np.isnan(values), np.where(correct, np.inf, -np.inf), values)


def paired_difference(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """Robust accuracy of ``after`` minus ``before`` on the same points (bool flags ``[n]`` each), with the
    2-SE noise level of a paired difference: SE = sqrt(b + c - (c - b)² / n) / n for b points robust only
    before and c only after (at least one discordant point's worth, so 0 vs 0 is never "significant")."""
    n = max(len(before), 1)
    b, c = int((before & ~after).sum()), int((~before & after).sum())
    se = max(b + c - (c - b) ** 2 / n, 1.0) ** 0.5 / n
    delta = (c - b) / n
    return {"delta": delta, "noise_2se": 2 * se, "beyond_noise": abs(delta) > 2 * se}


def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Which points ``[N]`` (bool, CPU) the model classifies correctly (eval mode, restored afterwards)."""
    from marginlab.robustness.checks import predict

    was_training = model.training
    model.eval()
    try:
        device = next((q.device for q in model.parameters()), torch.device("cpu"))
        return (predict(model, x.to(device), batch_size).argmax(1).cpu() == y.cpu()).cpu()
    finally:
        model.train(was_training)


def _disagreements(
    first: str, eps: list[float], own: Sequence[float | None], worst: list[float], tol: float
) -> list[str]:
    """Where the first attack alone overstates robustness by more than ``tol`` (a share of all points)."""
    out = []
    for e, a, w in zip(eps, own, worst, strict=False):
        if a is not None and a - w > tol + 1e-12:
            out.append(
                f"at eps={e:g} {first} alone reports {a:.1%} robust but the strongest evaluation {w:.1%}: "
                f"{first} overstates robustness here"
            )
    return out
