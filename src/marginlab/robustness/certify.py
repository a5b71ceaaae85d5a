"""The certificate pre-pass of the robustness evaluation and the soundness checks of its band.

A certified lower bound ``r`` of a correctly classified point's margin (CROWN by default, in the box
domain [0, 1]^d where the attacks search too) proves that no perturbation of norm <= ``r`` changes the
prediction: the point is robust at every ε <= ``r``, and no attack needs to run on it there. So per ε

    certified accuracy  <=  robust accuracy (attacks)  <=  clean accuracy,

a band around the true robust accuracy. A certificate and an attack that disagree (an adversarial
example, or a min-norm bound, inside a certified ball) cannot both be right: that is a bug in the
certifier or in the attack's verification, raised as :class:`SoundnessError`, never averaged away.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.estimators import ESTIMATORS, Estimator, MarginKind, build_estimator
from marginlab.robustness.attacks import AUTO_CERTIFIER, RobustnessSettings

__all__ = [
    "Certificates",
    "SoundnessError",
    "certified_at",
    "certify",
    "check_band",
    "check_bounds",
    "check_broken",
    "worth_certifying",
]

# Slack for comparing a certified radius (float64 bound propagation) with an attack's perturbation
# (float32 model): a perturbation shorter than radius * (1 - RTOL) - ATOL contradicts the certificate.
RTOL, ATOL = 1e-3, 1e-6


class SoundnessError(RuntimeError):
    """A certificate and an attack disagree, or the band is out of order: a bug, never a user mistake."""


@dataclass
class Certificates:
    """What the certificate pre-pass gives: signed certified radii ``radii [N]`` (float64, CPU; a
    correctly classified point is certified at ε when its radius >= ε; ``None`` without certificates),
    ``info`` (the certifier: ``estimator``, ``kind``, ``domain``, ``params``) and a one-line ``note``
    when ``certify="auto"`` found the model unsupported and went without."""

    radii: Tensor | None
    info: dict[str, Any] | None
    note: str | None = None


def certify(model: nn.Module, x: Tensor, y: Tensor, s: RobustnessSettings, todo: Tensor) -> Certificates:
    """Certified radii ``[N]`` of the points ``todo [N]`` (bool) of ``x [N, C, H, W]`` with labels
    ``y [N]`` by ``s.certify`` (see the module doc); the other points get radius 0 (nothing certified).

    ``"auto"`` runs CROWN and, when its preparation refuses the model (a :class:`ConfigError`: a layer
    bound propagation does not support), returns no radii and a note; a named certifier's errors pass.
    """
    if s.certify in (None, "off"):
        return Certificates(None, None)
    name = AUTO_CERTIFIER if s.certify == "auto" else str(s.certify)
    params = dict(s.certify_params)
    if "domain" in {f.name for f in dataclasses.fields(ESTIMATORS.get(name))}:
        # R^d by default: sound for the box too (the R^d margin is never above the box margin), and on a
        # 784-1024-10 MLP bound propagation over the L2 ball alone cost 0.05 s per point against 3 s over
        # ball ∩ box, with the same share certified (10 points); --certify-param domain=box for the box
        params.setdefault("domain", "rd")
    if s.certify == "auto" and _has_conv(model):
        # CROWN bounds on the hidden conv layers cost 40-60 s per point on the MNIST-CNN preset and still
        # certify 1-3% of the attacks' radius on naturally trained CNNs (docs/results.md section 8);
        # interval bounds there cost about 0.5 s and are tight on certifiably trained nets
        params.setdefault("intermediate", "ibp")
    estimator = build_estimator(name, **params)  # bad parameters: errors even with "auto"
    idx = todo.nonzero().flatten()
    try:
        found = estimator(model, x[idx], y[idx], p=s.norm)
    except ConfigError as e:
        if s.certify != "auto":
            raise
        return Certificates(None, None, f"no certificates: {name} cannot bound this model ({e})")
    kind = _achieved_kind(estimator)
    if kind not in (MarginKind.LOWER, MarginKind.EXACT):  # e.g. an exact solver that ran out of time
        raise ConfigError(f"certify {name!r} gave a {kind} on some point, not a certificate; use crown")
    radii = torch.zeros(len(x), dtype=torch.float64)
    radii[idx.cpu()] = torch.where(torch.isnan(found), 0.0, found).double()  # unknown: not certified
    domain = getattr(estimator, "domain", None)
    info = {
        "estimator": name,
        "kind": str(kind),
        "domain": domain,
        "params": params,
        "points": len(idx),
    }
    return Certificates(radii, info)


def _has_conv(model: nn.Module) -> bool:
    """Does ``model`` hold a convolution (where CROWN's hidden-layer bounds get expensive)?"""
    return any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules())


def _achieved_kind(estimator: Estimator) -> MarginKind:
    """The kind the estimator's last call achieved (its ``result_kind`` where it has one)."""
    achieved = getattr(estimator, "result_kind", None)
    return MarginKind(achieved()) if callable(achieved) else estimator.kind


def worth_certifying(correct: Tensor, bounds: Tensor | None, eps_min: float) -> Tensor:
    """``[N]`` bool: the points a certificate could decide at some ε >= ``eps_min``: correctly classified,
    and not broken at every ε by their min-norm bound ``bounds [N]`` already (certifying those would cost
    and decide nothing). Which pre-pass runs first changes no figure: a sound certificate never exceeds a
    bound."""
    if bounds is None:
        return correct
    return correct & (bounds.to(correct.device) > eps_min)


def certified_at(correct: Tensor, radii: Tensor | None, eps: float) -> Tensor:
    """``[N]`` bool: correctly classified with a certified radius >= ``eps`` (all False without radii)."""
    if radii is None:
        return torch.zeros_like(correct)
    return correct & (radii.to(correct.device) >= eps)


def contradicts(radii: Tensor, sizes: Tensor) -> Tensor:
    """``[n]`` bool: is a perturbation of norm ``sizes [n]`` that changes the prediction shorter than the
    certified ``radii [n]`` allow (beyond the float slack :data:`RTOL`, :data:`ATOL`)?"""
    return sizes.double() < radii.double() * (1 - RTOL) - ATOL


def check_broken(radii: Tensor | None, idx: Tensor, sizes: Tensor, eps: float) -> None:
    """Raise :class:`SoundnessError` if verified adversarial examples of the points ``idx [n]`` (their
    perturbation norms ``sizes [n]``, found at radius ``eps``) lie inside a certified ball."""
    if radii is None or len(idx) == 0:
        return
    bad = contradicts(radii.to(sizes.device)[idx], sizes)
    if bool(bad.any()):
        i = int(idx[bad][0])
        raise SoundnessError(
            f"an attack at eps={eps:g} found an adversarial example of norm {float(sizes[bad][0]):.6g} for "
            f"point {i}, certified robust up to {float(radii[i]):.6g}: the certifier or the attack is wrong"
        )


def check_bounds(correct: Tensor, radii: Tensor | None, bounds: Tensor | None, own: bool) -> str | None:
    """Margin upper bounds ``bounds [N]`` below certified ``radii [N]`` on correctly classified points:
    from the evaluator's own min-norm attack (``own``) a :class:`SoundnessError`; given by the caller, a
    warning (returned), since they may be margins over R^d, which the box may exceed."""
    if radii is None or bounds is None:
        return None
    bad = correct.cpu() & contradicts(radii, bounds)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    msg = (
        f"{int(bad.sum())} points have a margin upper bound below their certified radius (point {i}: "
        f"{float(bounds[i]):.6g} < {float(radii[i]):.6g})"
    )
    if own:
        raise SoundnessError(f"{msg}: the certifier or the min-norm attack is wrong")
    return f"{msg}; the certificates win (are the given bounds margins over R^d?)"


def check_band(certified: list[float] | None, robust: list[float], clean: float, eps: list[float]) -> None:
    """Raise :class:`SoundnessError` unless certified <= robust <= clean accuracy at every ε."""
    for j, e in enumerate(eps):
        low = certified[j] if certified is not None else 0.0
        if not low <= robust[j] + 1e-12 or not robust[j] <= clean + 1e-12:
            raise SoundnessError(
                f"band out of order at eps={e:g}: certified {low:.4f}, robust {robust[j]:.4f}, "
                f"clean {clean:.4f}"
            )
