"""The estimator interface: ``(model, x, y, p) -> signed margins [N]`` plus what kind of number it is.

Sign convention (shared by every estimator): the margin of ``(x, y)`` is ``+d`` when the model
predicts ``y`` and ``-d`` otherwise, where ``d`` is the ``p``-norm distance from ``x`` to the boundary
of the region where ``y`` wins. The sign is exact (it comes from the prediction); the *kind* of an
estimator says how its magnitude relates to ``d``: an ``upper bound`` estimator never returns a
magnitude below ``d``, a ``lower bound`` one never above ``d``. So for correctly classified points
a lower bound <= the margin <= an upper bound, and for misclassified ones the order flips.

Domains: a margin is a distance within a domain, the image box [0,1]^d (``"box"``) or all of R^d
(``"rd"``); :func:`marginlab.bounds.domain.parse_domain` reads the spellings. The box forbids some
directions, so the box margin is never below the R^d margin. Each estimator has a ``domain`` setting and
a class attribute ``domains``, the domains whose margin its kind describes (the soundness rules):

- a lower bound of the R^d margin is one of the box margin too (``lipschitz``: both);
- an attack searches inside the box, so its distance is an upper bound of both margins (the attacks and
  ``best``: both);
- ``exact-linear``, ``crown`` and ``mip`` compute in the domain asked for (both);
- ``first-order`` and ``sampling`` estimate the R^d margin (``{"rd"}``).

An estimator asked for a domain it does not honour: an ``estimate`` still is one, so it runs, says so in
one warning line and its result states the domain it does estimate (:meth:`Estimator.result_domain`);
an exact value or a bound would be wrong, so that is a one-line ConfigError when the estimator is built.

Per-point extras: after a call, :meth:`Estimator.point_columns` (small per-point columns, e.g. a solver's
status), :meth:`Estimator.point_arrays` (large per-point arrays, e.g. perturbations) and
:meth:`Estimator.result_kind` (the kind the call achieved, e.g. ``upper bound`` for an exact method that
hit its time limit) describe the result beyond its values; ``estimate_margins`` keeps them in the result.
"""

import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar, final

import numpy as np
import torch
from torch import nn

from marginlab.base.config import check_count, from_dict
from marginlab.base.errors import ConfigError
from marginlab.base.registry import Registry
from marginlab.bounds.domain import DOMAINS, parse_domain
from marginlab.core.norms import Norm

log = logging.getLogger(__name__)


class MarginKind(StrEnum):
    """What an estimator's number is, relative to the true distance to the boundary."""

    EXACT = "exact"
    LOWER = "lower bound"
    UPPER = "upper bound"
    ESTIMATE = "estimate"


ESTIMATORS: Registry[type["Estimator"]] = Registry("estimator")


NORMS: tuple[Norm, ...] = (Norm.L2, Norm.Linf)  # the norms estimators work in (each says which it supports)
NORM_ERROR = "unsupported norm p={value!r}; use 2 or inf"  # Norm.parse's message for any other value


def norm_order(p: Norm | float | int | str) -> float:
    """Deprecated: use ``Norm.parse(p, NORMS, error=NORM_ERROR).p`` (:class:`marginlab.core.norms.Norm`).

    ``2``, ``"2"``, ``"l2"`` -> 2.0; ``inf``, ``"inf"``, ``"linf"`` -> inf; else a ConfigError.
    """
    warnings.warn(
        "marginlab.estimators.norm_order is deprecated; use marginlab.core.norms.Norm.parse(p).p",
        DeprecationWarning,
        stacklevel=2,
    )
    return Norm.parse(p, NORMS, error=NORM_ERROR).p


def register(name: str) -> Callable[[type["Estimator"]], type["Estimator"]]:
    """Class decorator: register an estimator class under ``name`` (also sets ``cls.name``)."""

    def deco(cls: type["Estimator"]) -> type["Estimator"]:
        cls.name = name
        ESTIMATORS.add(name, cls)
        return cls

    return deco


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode with frozen parameters, restored afterwards.

    Freezing keeps the estimators' backward passes from computing (and, for libraries that call
    ``.backward()``, accumulating) parameter gradients, which would corrupt a training step that
    tracks margins in between.
    """
    modes = [(m, m.training) for m in model.modules()]  # per module: mixed modes survive too
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    return next(model.parameters(), torch.empty(0)).device


@dataclass(kw_only=True)
class Estimator(ABC):
    """Base class. Subclasses set ``kind``, ``needs``, ``norms``, ``domains`` and fill :meth:`_estimate`.

    ``needs`` names what the estimator requires of the model beyond ``[N,C,H,W] -> logits [N,K]``:
    ``"grad"`` (differentiable in x), ``"linear"`` (a linear model), ``"layers"`` (a MarginNet or
    ``nn.Sequential`` of supported layers). ``batch_size`` points go through :meth:`_estimate` at once.
    ``domain``: the domain asked for (``"box"`` or ``"rd"``); ``domains``: those the estimator's kind
    holds in (module docstring). Estimators with per-point extras override :meth:`point_columns`,
    :meth:`point_arrays` and :meth:`result_kind`.
    """

    name: ClassVar[str] = "?"
    kind: ClassVar[MarginKind]
    needs: ClassVar[frozenset[str]] = frozenset()
    norms: ClassVar[frozenset[float]] = frozenset({2.0, math.inf})
    domains: ClassVar[frozenset[str]] = frozenset(DOMAINS)

    batch_size: int = 256
    domain: str = "box"

    def __post_init__(self) -> None:
        """Range checks (types are checked by :func:`build_estimator`); subclasses extend it."""
        check_count(self.param_name("batch_size"), self.batch_size)
        try:
            self.domain = parse_domain(self.domain)
        except ConfigError as e:
            raise ConfigError(f"{self.param_name('domain')}: {e}") from None
        if self.domain not in self.domains and self.kind is not MarginKind.ESTIMATE:
            raise ConfigError(
                f"{self.name} gives a {self.kind} of the margin over {_words(self.domains)} only, "
                f"not over {_words({self.domain})}; set {self.param_name('domain')}="
                f"{' or '.join(sorted(self.domains))}"
            )

    def result_domain(self) -> str:
        """The domain the results are margins in: ``domain`` when honoured, else the one it estimates."""
        return self.domain if self.domain in self.domains else min(self.domains)

    def result_kind(self) -> MarginKind:
        """The kind the last call achieved (default: the class's ``kind``; an exact method that ran out of
        time on some point may return ``MarginKind.UPPER``)."""
        return self.kind

    def point_columns(self) -> dict[str, list[object]]:
        """Extra per-point columns of the last call, ``{column: [N] values}`` (default none): small values
        (numbers, short strings) that ``marginlab margins`` writes as ``<estimator>.<column>``."""
        return {}

    def point_arrays(self) -> dict[str, np.ndarray]:
        """Large per-point arrays of the last call, ``{name: array [N, ...]}`` (default none), saved only
        on request (``marginlab margins --save-arrays``), never in ``summary.json``."""
        return {}

    def param_name(self, field: str) -> str:
        """``"ddn.steps"``: how a parameter is named in ``--param`` and in error messages."""
        return f"{self.name}.{field}"

    @final
    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, p: Norm | float | str = 2
    ) -> torch.Tensor:
        """Signed margins ``[N]`` (float64, CPU) of images ``x [N,C,H,W]`` in [0, 1] with labels ``y [N]``.

        ``p``: the norm, any spelling :meth:`Norm.parse` accepts (``2``, ``"L2"``, ``inf``, ``"Linf"``);
        the hooks get its order as a float (2.0 or ``math.inf``).
        """
        p = Norm.parse(p, NORMS, error=NORM_ERROR).p
        if p not in self.norms:
            raise ConfigError(f"{self.name} does not support p={p}; supported: {sorted(self.norms)}")
        _check_inputs(x, y)
        if self.domain not in self.domains:
            log.warning(
                "%s estimates the margin over %s, not over %s; its result is marked %s",
                self.name, _words(self.domains), _words({self.domain}), self.result_domain(),
            )  # fmt: skip
        if len(x) == 0:
            return torch.empty(0, dtype=torch.float64)
        device = model_device(model)
        out: list[torch.Tensor] = []
        with evaluating(model):
            self._prepare(model, x[:1].to(device), p)
            _check_labels(model, x[:1].to(device), y)
            for start in range(0, len(x), self.batch_size):
                xb = x[start : start + self.batch_size].to(device)
                yb = y[start : start + self.batch_size].to(device)
                out.append(self._estimate(model, xb, yb, p).detach().to("cpu", torch.float64))
        return torch.cat(out)

    def _prepare(self, model: nn.Module, x1: torch.Tensor, p: float) -> None:  # noqa: B027
        """Hook run once per call before the batches (e.g. to compute per-model constants)."""

    @abstractmethod
    def _estimate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        """Signed margins ``[n]`` of one batch ``x [n,C,H,W]``, ``y [n]`` (model in eval mode)."""


def _words(domains: frozenset[str] | set[str]) -> str:
    """How messages name domains: ``{"box"}`` -> ``"the box [0,1]^d"``, ``{"rd"}`` -> ``"R^d"``."""
    words = {"box": "the box [0,1]^d", "rd": "R^d"}
    return " and ".join(words[d] for d in sorted(domains, reverse=True))


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ConfigError(f"inputs must be a float tensor [N,C,H,W], got {x.dtype} of shape {tuple(x.shape)}")
    if y.ndim != 1 or y.is_floating_point() or len(y) != len(x):
        raise ConfigError(f"labels must be an integer tensor [N] with N={len(x)}, got shape {tuple(y.shape)}")


def _check_labels(model: nn.Module, x1: torch.Tensor, y: torch.Tensor) -> None:
    with torch.no_grad():
        k = model(x1).shape[1]
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ConfigError(f"labels must lie in [0, {k - 1}] for this {k}-class model")


def build_estimator(name: str, **params: object) -> Estimator:
    """Instantiate estimator ``name`` with keyword ``params``, checked: unknown parameters, values of the
    wrong type (against the fields' type hints, ``config.from_dict``) and out-of-range values (each
    estimator's ``__post_init__``) raise a one-line ConfigError naming ``name.param``."""
    cls = ESTIMATORS.get(name)
    allowed = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"estimator {name!r} has no parameter {unknown[0]!r}; parameters: {', '.join(allowed)}"
        )
    return from_dict(cls, params, where=name)


def validate_params(name: str, params: object, where: str = "") -> dict[str, Any]:
    """Check estimator ``name``'s parameters ``params`` (a dict from a config or ``--param``) as
    :func:`build_estimator` does, without running anything; return them converted to the fields' types.

    Configs call it while they are validated, so a bad value fails before any run directory exists;
    ``where`` (e.g. ``"tracking.params.ddn"``) is put in front of the message.
    """
    try:
        if not isinstance(params, dict):
            raise ConfigError(f"the parameters of estimator {name!r} must be a table, got {params!r}")
        estimator = build_estimator(name, **params)
    except ConfigError as e:
        if not where:
            raise
        raise ConfigError(f"{where}: {e}") from None
    return {k: getattr(estimator, k) for k in params}
