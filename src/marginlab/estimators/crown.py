"""``crown``: a certified lower bound of the margin by linear bound propagation and a search on the radius.

For a point ``x`` predicted as its label ``y``, the radius ``eps`` is *certified* when the bound
propagation of :mod:`marginlab.bounds.crown` proves ``min_{k != y} (f_y - f_k)(x') > 0`` for every ``x'``
in the ball ``||x' - x||_p <= eps`` (intersected with the image box [0,1]^d in the ``box`` domain).

Misclassified points (sign rule of :mod:`marginlab.estimators.base`): the radius is certified when one
class ``k`` provably beats ``y`` on the whole ball (``f_k - f_y > 0``), so no point of the ball lies in
the region of ``y``; the value is minus that radius, whose magnitude is a lower bound of the distance
into the region of ``y``.

The search (:func:`certified_radius`), batched over points, keeps per point a certified radius ``lo``
and a radius ``hi`` the bounds failed at. One *pass* at a radius ``e`` computes every intermediate
bound over the ball of radius ``e`` and the specification's linear bounds ``A x + d`` of the input.
Those intermediate bounds hold on every smaller ball too, so with them fixed the largest radius
``g(e) <= e`` at which ``A x + d`` stays positive is certified as well (closed form in R^d, a cheap
bisection on the last step alone in the box: :func:`marginlab.bounds.domain.largest_radius`). So:

- a pass that certifies ``e`` raises ``lo`` to ``e``; one that fails sets ``hi = e`` and raises ``lo``
  to ``g(e)``, and its intermediate bounds become the *prior* of the passes below ``e`` (intersected
  with theirs; neurons it proves stable need no work);
- the first probe is ``hi`` when given (e.g. an attack's radius); else the search grows from the warm
  start (or a 64th of the box's diameter). Each pass measures the share of the margin (the
  specification at radius 0) its bound used, ``u(e) = 1 - bound / margin``; near the root ``u`` grows
  like a power of ``e``, so the secant through the last two passes in log-log coordinates predicts
  where ``u`` reaches 1: the next probe (within 1.5-4x ``lo`` while growing; inside ``(lo, hi)`` by a
  tenth of the gap, or 0.4 ``rtol`` near the end, after), bisection when there is no prediction or
  one end moved three times in a row, and right above ``lo`` after ``g(e)`` raised it; until
  ``hi - lo <= rtol * hi``.

The result is ``lo``: every value reported was certified by one pass (never above what the bounds
prove). Warm start: the global Lipschitz bound (``estimators/lipschitz.py``, also certified) is the
initial ``lo`` when ``warm_start``. In the ``box`` domain a certified ball that covers the whole box
means no adversarial image exists at all: the margin is ``+inf``. On linear models in the ``rd`` domain
the bound is exact, so the result is the exact margin up to ``rtol``.
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.alpha import optimized_rows
from marginlab.bounds.crown import CROWN_BUDGET, INTERMEDIATE, Bounds, layer_bounds, margin_spec, spec_rows
from marginlab.bounds.domain import InputSet, largest_radius, parse_domain
from marginlab.bounds.graph import Graph, as_graph
from marginlab.bounds.network import network_graph
from marginlab.bounds.ops import Op
from marginlab.estimators.base import Estimator, MarginKind, build_estimator, register

MAX_PASSES = 40  # full passes per point at most (the search usually needs 4-8)


@dataclass(frozen=True)
class Settings:
    """How one pass bounds the network: ``p``, ``box`` (the domain), ``crown_budget`` (floats per chunk
    of rows), ``intermediate`` (``"crown"`` or ``"ibp"``), ``alpha_steps`` (0: CROWN's slopes)."""

    p: float
    box: bool
    crown_budget: int = CROWN_BUDGET
    intermediate: str = "crown"
    alpha_steps: int = 0


def _pass(
    graph: Graph, x: Tensor, spec: Tensor, eps: Tensor, prior: Bounds | None, s: Settings
) -> tuple[Bounds, Tensor, Tensor]:
    """One pass at radii ``eps [B]``: ``(bounds, A [B,S,D], d [B,S])``."""
    inset = InputSet(x.flatten(1), eps, s.p, s.box)
    bounds = layer_bounds(graph, inset, crown_budget=s.crown_budget, prior=prior, intermediate=s.intermediate)
    if s.alpha_steps > 0:
        a, d = optimized_rows(graph, bounds, spec, inset, steps=s.alpha_steps, crown_budget=s.crown_budget)
    else:
        a, d = spec_rows(graph, bounds, spec, crown_budget=s.crown_budget)
    return bounds, a, d


def certified(
    network: Graph | Sequence[Op],
    x: Tensor,
    y: Tensor,
    sign: Tensor,
    eps: Tensor,
    *,
    p: float,
    box: bool,
    crown_budget: int = CROWN_BUDGET,
    alpha_steps: int = 0,
) -> Tensor:
    """``[B]`` bool: is the ball of radius ``eps [B]`` around ``x [B,*in]`` certified (see module doc)?"""
    graph = as_graph(network)
    spec = margin_spec(y, graph.num_classes, sign)
    settings = Settings(p, box, crown_budget, alpha_steps=alpha_steps)
    x = x.double()
    _, a, d = _pass(graph, x, spec, eps.double(), None, settings)
    low = InputSet(x.flatten(1), eps.double(), p, box).concretize(a) + d
    return torch.where(sign > 0, low.min(dim=1).values > 0, low.max(dim=1).values > 0)


def certified_radius(
    network: Graph | Sequence[Op],
    x: Tensor,
    y: Tensor,
    sign: Tensor,
    *,
    p: float,
    box: bool,
    lo: Tensor | None = None,
    hi: Tensor | None = None,
    rtol: float = 1e-3,
    crown_budget: int = CROWN_BUDGET,
    intermediate: str = "crown",
    alpha_steps: int = 0,
) -> Tensor:
    """Largest certified radius ``[B]`` (float64) of ``x [B,*in]`` to relative precision ``rtol`` (see the
    module doc).

    ``sign [B]``: +1 for correctly classified points, -1 otherwise; ``lo [B]``: radii already known
    to be certified (default 0); ``hi [B]``: where to probe first, e.g. an attack's radius (``inf`` or
    ``None``: unknown). ``+inf`` where the ball covering the whole box is certified (box domain).
    """
    graph = as_graph(network)
    settings = Settings(p, box, crown_budget, intermediate, alpha_steps)
    x = x.double()
    b = len(x)
    lo = torch.zeros(b, dtype=torch.float64) if lo is None else lo.double().clamp_min(0).clone()
    top = torch.full((b,), math.inf, dtype=torch.float64) if hi is None else hi.double().clone()
    top = torch.where(top > lo, top, torch.full_like(top, math.inf))  # an upper end must lie above lo
    cover = 1.0 if p == math.inf else math.sqrt(x[0].numel())  # the box lies in this ball around x
    spec = margin_spec(y, graph.num_classes, sign)
    values = torch.einsum("bsk,bk->bs", spec, graph.forward(x))  # the specification at radius 0
    margin = torch.where(sign > 0, values.amin(1), values.amax(1))
    state = _Search(lo, top, cover if box else math.inf, margin)
    for _ in range(MAX_PASSES):
        idx, eps = state.probes(rtol)
        if len(idx) == 0:
            break
        prior = state.prior_of(idx)
        bounds, a, d = _pass(graph, x[idx], spec[idx], eps, prior, settings)
        good = sign[idx] > 0
        low = InputSet(x[idx].flatten(1), eps, p, box).concretize(a) + d
        value = torch.where(good, low.amin(1), low.amax(1))  # > 0: certified at eps
        g = largest_radius(a, d, x[idx].flatten(1), p=p, box=box, hi=eps, every=good)
        state.update(idx, eps, torch.where(value > 0, eps, g.clamp(max=eps)), value, bounds)
    return state.lo


class _Search:
    """The state of :func:`certified_radius` per point: ``lo`` (certified) and ``hi`` (failed or given);
    the last two passes ``(e, used)`` with ``used = 1 - bound / margin`` (< 1 where certified, > 1
    where not; ``nan``: none); how often the same end moved in a row; and the intermediate bounds of
    the last failure (the prior of the probes below it)."""

    def __init__(self, lo: Tensor, hi: Tensor, cover: float, margin: Tensor) -> None:
        self.lo, self.hi, self.cover, self.margin = lo, hi, cover, margin
        self.last = [torch.full_like(lo, math.nan) for _ in range(4)]  # e1, used1 (older), e2, used2
        self.moved = torch.zeros_like(lo)  # +k: lo moved the last k times, -k: hi
        self.raised = torch.zeros_like(lo, dtype=torch.bool)  # the last pass raised lo to its g
        self.first = torch.isfinite(hi)
        self.prior: Bounds = {}
        self.has_prior = torch.zeros_like(lo, dtype=torch.bool)

    def probes(self, rtol: float) -> tuple[Tensor, Tensor]:
        """The points still searching ``[b]`` and the radius each probes next ``[b]`` (module doc)."""
        unknown = ~torch.isfinite(self.hi) & torch.isfinite(self.lo)
        idx = (unknown | (torch.isfinite(self.hi) & (self.hi - self.lo > rtol * self.hi))).nonzero()[:, 0]
        lo, hi, moved = self.lo[idx], self.hi[idx], self.moved[idx]
        e1, u1, e2, u2 = (t[idx] for t in self.last)
        # near the root the margin used grows like c e^q: the secant in log-log through the last two
        # passes, and the radius where it reaches 1
        q = torch.log(u2 / u1) / torch.log(e2 / e1)
        root = e2 * u2 ** (-1 / q.clamp(0.5, 12.0))
        valid = torch.isfinite(root) & (q > 0) & (u1 > 0) & (u2 > 0)
        start = (self.cover if math.isfinite(self.cover) else 1.0) / 64
        grow = torch.where(valid, root, 2 * lo).clamp(1.5 * lo, 4 * lo)
        grow = torch.where(lo > 0, grow, torch.full_like(lo, start)).clamp(max=self.cover)
        gap, tol = hi - lo, rtol * hi
        margin = torch.where(gap > 8 * tol, gap / 10, 0.4 * tol)
        aim = root + moved.sign() * 0.4 * tol  # towards the end that did not move last: likely closes
        secant = torch.minimum(torch.maximum(aim, lo + margin), hi - margin)
        mid = torch.where(lo > 0, (lo * hi).sqrt(), hi / 4)
        mid = torch.where(hi > 2 * lo, mid, (lo + hi) / 2)
        inside = torch.where(valid & (moved.abs() < 3), secant, mid)  # one end stuck: bisect
        # lo just raised by g(e): probe right above it (where the bound on linear pieces is exact,
        # the next failure there ends the search)
        inside = torch.where(self.raised[idx], torch.minimum(lo * (1 + 0.6 * rtol), lo + gap / 2), inside)
        inside = torch.where(self.first[idx], hi, inside)  # a given upper end: probed first
        return idx, torch.where(torch.isfinite(hi), inside, grow)

    def prior_of(self, idx: Tensor) -> Bounds | None:
        """The prior bounds of the points ``idx`` (``(-inf, inf)`` where none): they hold on every probe
        below the failed radius they were computed at, and every probe lies below ``hi``."""
        if not bool(self.has_prior[idx].any()):
            return None
        return {k: (lo[idx], hi[idx]) for k, (lo, hi) in self.prior.items()}

    def update(self, idx: Tensor, eps: Tensor, g: Tensor, value: Tensor, bounds: Bounds) -> None:
        """Record a pass at ``eps [b]`` for the points ``idx``: its certification margin ``value [b]``
        (> 0: certified) and the radius ``g [b] <= eps`` its fixed intermediate bounds certify."""
        ok = value > 0
        used = torch.where(self.margin[idx] > 0, 1 - value / self.margin[idx], math.nan)
        raised = ~ok & (g > self.lo[idx])  # lo raised by g: right above it next
        self.raised[idx], self.first[idx] = raised, False
        e1, u1, e2, u2 = self.last
        e1[idx], u1[idx], e2[idx], u2[idx] = e2[idx], u2[idx], eps, used
        self.lo[idx] = torch.maximum(self.lo[idx], torch.where(ok, eps, g))
        moved = self.moved[idx]
        up, down = torch.where(moved > 0, moved + 1, 1.0), torch.where(moved < 0, moved - 1, -1.0)
        self.moved[idx] = torch.where(ok, up, down)
        failed = idx[~ok]
        self.hi[failed] = eps[~ok]
        whole = idx[ok & (eps >= self.cover)]  # the ball holds the whole box: nothing adversarial
        self.lo[whole], self.hi[whole] = math.inf, math.inf
        if len(failed) == 0:
            return
        for k, (lo, hi) in bounds.items():
            if k not in self.prior:
                shape = (len(self.lo), *lo.shape[1:])
                self.prior[k] = (lo.new_full(shape, -math.inf), hi.new_full(shape, math.inf))
            self.prior[k][0][failed] = lo[~ok]
            self.prior[k][1][failed] = hi[~ok]
        self.has_prior[failed] = True


@register("crown")
@dataclass(kw_only=True)
class Crown(Estimator):
    """Certified lower bound: the largest radius that bound propagation certifies (see the module doc).

    ``domain``: ``"box"`` ([0,1]^d, default) or ``"rd"``; ``rtol``: precision of the radius search;
    ``crown_budget``: floats of one chunk of back-substitution rows (memory; see
    :mod:`marginlab.bounds.crown`); ``intermediate``: ``"crown"`` (default) or ``"ibp"`` (interval
    bounds inside the network: fast, loose); ``alpha_steps``: Adam steps of alpha-CROWN on the final
    specification's ReLU slopes (0: off); ``warm_start``: start from the Lipschitz bound.
    """

    kind = MarginKind.LOWER
    needs = frozenset({"layers"})
    batch_size: int = 64
    domain: str = "box"
    rtol: float = 1e-3
    crown_budget: int = CROWN_BUDGET
    intermediate: str = "crown"
    alpha_steps: int = 0
    warm_start: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.domain = parse_domain(self.domain)
        if not 0 < self.rtol < 1:
            raise ConfigError(f"crown: rtol must be in (0, 1), got {self.rtol}")
        if self.intermediate not in INTERMEDIATE:
            raise ConfigError(f"crown: intermediate must be 'crown' or 'ibp', got {self.intermediate!r}")
        if self.alpha_steps < 0 or self.crown_budget < 1:
            raise ConfigError("crown: alpha_steps must be >= 0 and crown_budget >= 1")

    def _prepare(self, model: nn.Module, x1: Tensor, p: float) -> None:
        self._graph = network_graph(model, tuple(x1.shape[1:]))
        # The warm start is taken as certified, so its logits must not carry float32 rounding: a
        # float32 forward can put a Lipschitz radius a few 1e-6 (relative) above the true one, which
        # is exact for a linear model. A float64 copy keeps it a lower bound.
        self._model64 = copy.deepcopy(model).double().eval() if self.warm_start else None

    def _estimate(self, model: nn.Module, x: Tensor, y: Tensor, p: float) -> Tensor:
        with torch.no_grad():
            correct = model(x).argmax(dim=1) == y
        sign = correct.double() * 2 - 1
        lo = None
        if self._model64 is not None:
            try:
                lipschitz = build_estimator("lipschitz", batch_size=len(x))
                lo = lipschitz(self._model64, x.double(), y, p=p).abs()
            except ConfigError:  # layers the Lipschitz bound does not cover (e.g. average pooling)
                lo = None
        radius = certified_radius(
            self._graph,
            x.cpu(),
            y.cpu(),
            sign.cpu(),
            p=p,
            box=self.domain == "box",
            lo=lo,
            rtol=self.rtol,
            crown_budget=self.crown_budget,
            intermediate=self.intermediate,
            alpha_steps=self.alpha_steps,
        )
        return torch.where(correct.cpu(), radius, -radius)
