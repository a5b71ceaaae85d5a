"""The stages of one robustness evaluation, per ε in ascending order, on the points still undecided.

Before any stage, the points certified at ε (:mod:`marginlab.robustness.certify`) are set aside: they are
robust, and no stage runs on them. Then ``bound`` breaks every point whose min-norm bound is <= ε, and
each fixed-ε attack runs only on the points neither certified nor broken so far. A point broken at ε
stays broken at every larger ε, so each ε starts from the previous one's survivors. Every adversarial
example is verified here (norm <= ε, inside [0, 1], misclassified) and checked against the certificates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.base.inputs import ArrayInput
from marginlab.core.predict import predict_labels
from marginlab.estimators import estimate_margins
from marginlab.robustness.attacks import ATTACKS, RobustnessSettings
from marginlab.robustness.certify import SoundnessError, certified_at, check_broken

__all__ = ["DECIDED", "Outcome", "run_cascade", "upper_bounds", "verify"]

# How each correctly classified point is decided at one ε (the keys of ``RobustnessResult.decided``):
# certified; broken by the min-norm bound; broken by an attack at a smaller ε; handed to the attacks.
DECIDED = ("certified", "bound", "earlier", "attacked")


def upper_bounds(
    model: nn.Module, x: Tensor, y: Tensor, s: RobustnessSettings, given: ArrayInput | None
) -> Tensor | None:
    """Per-point margin upper bounds [N] (float64, CPU): ``given``, else the pre-pass, else ``None``."""
    if given is not None:
        b = torch.as_tensor(np.asarray(given, dtype=np.float64)).flatten()
        if len(b) != len(y):
            raise ConfigError(f"margin_upper has {len(b)} values for {len(y)} points")
        return torch.where(torch.isnan(b), torch.inf, b)  # unknown bound: never counts as broken
    if s.bound is None:
        return None
    params = {s.bound: dict(s.bound_params)} if s.bound_params else None
    res = estimate_margins(model, x, y, [s.bound], p=s.norm, batch_size=s.batch_size, params=params)
    return res[s.bound].values


def verify(
    model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, eps: float, s: RobustnessSettings
) -> tuple[Tensor, Tensor]:
    """Which proposed ``x_adv [n, ...]`` are adversarial (in the ε-ball, in [0, 1], misclassified), and
    the norms ``[n]`` of their perturbations."""
    d = (x_adv - x).flatten(1)
    size = d.norm(dim=1) if s.norm == "L2" else d.abs().amax(dim=1)
    inside = (size <= eps * (1 + 1e-5) + 1e-7) & (x_adv.flatten(1).amin(1) >= -1e-6)
    inside &= x_adv.flatten(1).amax(1) <= 1 + 1e-6
    wrong = predict_labels(model, x_adv, s.batch_size) != y
    return inside & wrong, size


@dataclass
class Outcome:
    """What :func:`run_cascade` found: ``accuracy[stage][j]`` after each stage at ``eps[j]`` (``None``
    where it did not run), ``attacked[stage][j]`` the points it ran on, ``seconds`` per stage, the
    worst-case robust flags ``rows`` (``[N]`` per ε), the ``certified`` accuracy per ε (``None`` without
    certificates) and ``decided[how][j]``: how many points were decided how (:data:`DECIDED`)."""

    accuracy: dict[str, list[float | None]]
    attacked: dict[str, list[int]]
    seconds: dict[str, float]
    rows: list[Tensor] = field(default_factory=list)
    certified: list[float] | None = None
    decided: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in DECIDED})


def run_cascade(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    correct: Tensor,
    bounds: Tensor | None,
    radii: Tensor | None,
    eps_list: list[float],
    stages: list[str],
    s: RobustnessSettings,
    warn: Callable[[str], None],
) -> Outcome:
    """Run the ``stages`` per ε on the points neither certified (``radii [N]``) nor broken; see the
    module doc. ``bounds [N]``: the min-norm bounds of the ``bound`` stage; ``warn`` takes the notes."""
    out = Outcome({st: [] for st in stages}, {st: [] for st in stages}, dict.fromkeys(stages, 0.0))
    out.certified = None if radii is None else []
    robust = correct.clone()
    aa_eps = None if s.aa_eps is None else list(s.aa_eps)
    for e in eps_list:
        cert = certified_at(correct, radii, e)
        _count(out, correct, cert, bounds, robust, e)
        robust = robust.clone()
        for stage in stages:
            t0 = time.perf_counter()
            todo = (robust & ~cert).nonzero().flatten() if e > 0 else robust.new_zeros(0, dtype=torch.long)
            if stage == "autoattack" and aa_eps is not None and not any(math.isclose(e, w) for w in aa_eps):
                out.attacked[stage].append(0)  # AutoAttack only at the radii asked for (the costly stage)
                out.accuracy[stage].append(None)
                continue
            out.attacked[stage].append(len(todo))
            if len(todo) and stage == "bound":
                assert bounds is not None
                robust[todo[bounds.to(x.device)[todo] <= e]] = False
            elif len(todo):
                x_adv, notes = ATTACKS.get(stage)(model, x[todo], y[todo], e, s)
                for note in notes:
                    warn(note)
                ok, size = verify(model, x[todo], x_adv, y[todo], e, s)
                check_broken(radii, todo[ok], size[ok], e)
                robust[todo[ok]] = False
            out.seconds[stage] += time.perf_counter() - t0
            out.accuracy[stage].append(float(robust.double().mean()))
        if bool((cert & ~robust).any()):
            raise SoundnessError(f"a point certified at eps={e:g} was counted broken")
        if out.certified is not None:
            out.certified.append(float(cert.double().mean()))
        out.rows.append(robust.cpu())
    return out


def _count(
    out: Outcome, correct: Tensor, cert: Tensor, bounds: Tensor | None, robust: Tensor, e: float
) -> None:
    """Record how the correct points are decided at ``e`` (before its stages; ``robust``: the survivors
    of the smaller radii)."""
    by_bound = correct & ~cert
    by_bound &= bounds.to(correct.device) <= e if bounds is not None else torch.zeros_like(correct)
    rest = correct & ~cert & ~by_bound
    counts = {"certified": cert, "bound": by_bound, "earlier": rest & ~robust, "attacked": rest & robust}
    for key in DECIDED:
        out.decided[key].append(int(counts[key].sum()))
