"""The attack norm: one type, :class:`Norm`, with the one parser of every spelling marginlab accepts.

A margin is a distance ``||delta||_p`` in an Lp norm (``p`` in {1, 2, inf}). Its *dual* norm
``||a||_q = sup_{||x||_p <= 1} a . x`` has the exponent ``q`` with ``1/p + 1/q = 1`` (1 <-> inf,
2 <-> 2), and Hoelder's inequality ``|a . x| <= ||a||_q ||x||_p`` is tight: for every ``a`` some unit
``x`` attains it (``x = a / ||a||_2`` for p = 2, ``x = sign(a)`` for p = inf, ``x = sign(a_j) e_j`` at the
largest ``|a_j|`` for p = 1). Hence the Lp distance from ``x0`` to the hyperplane ``a . x + c = 0`` is
``|a . x0 + c| / ||a||_q``, and a first-order (linearised) margin divides by the dual norm of a gradient.

Parse once, where a value enters (CLI arguments, config dataclasses, Python API entry points), with
:meth:`Norm.parse`, and pass the :class:`Norm` (or its float ``.p``) inward. A ``Norm`` *is* its canonical
spelling (a ``StrEnum``: ``Norm.L2 == "L2"``, ``str(Norm.Linf) == "Linf"``, JSON writes ``"Linf"``), the
spelling the run files record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from marginlab.base.errors import ConfigError

__all__ = ["Norm"]

# every accepted spelling, lower-cased, without a leading "l": "L2" -> "2", "linf" -> "inf"
_SPELLINGS: dict[str, str] = {
    "1": "L1",
    "1.0": "L1",
    "2": "L2",
    "2.0": "L2",
    "inf": "Linf",
    "infinity": "Linf",
    "∞": "Linf",
}
_ORDERS: dict[str, float] = {"L1": 1.0, "L2": 2.0, "Linf": math.inf}
_DUALS: dict[str, str] = {"L1": "Linf", "L2": "L2", "Linf": "L1"}
_DEFAULT_ERROR = "unsupported norm p={value!r}; use 1, 2 or inf ('l1', 'l2', 'linf')"


class Norm(StrEnum):
    """An Lp norm, p in {1, 2, inf}; the member's value (and ``.name``, ``str()``) is its canonical spelling.

    ``.p``: the order as a float (1.0, 2.0, ``math.inf``); ``.dual``: the dual norm (``1/p + 1/q = 1``);
    ``.q``: the dual's order; ``.symbol``: the spelling of figure labels (``"L∞"``).
    """

    L1 = "L1"
    L2 = "L2"
    Linf = "Linf"

    @property
    def p(self) -> float:
        """The order p as a float: 1.0, 2.0 or ``math.inf`` (what ``torch.linalg.vector_norm`` takes)."""
        return _ORDERS[self.value]

    @property
    def dual(self) -> Norm:
        """The dual norm ``||a||_* = sup_{||x|| <= 1} a . x``: L1 <-> Linf, L2 <-> L2."""
        return Norm(_DUALS[self.value])

    @property
    def q(self) -> float:
        """The dual exponent q of p (``1/p + 1/q = 1``): 1 -> inf, 2 -> 2, inf -> 1."""
        return self.dual.p

    @property
    def symbol(self) -> str:
        """How figures name the norm: ``"L1"``, ``"L2"``, ``"L∞"``."""
        return "L∞" if self is Norm.Linf else self.value

    @classmethod
    def parse(cls, value: Any, among: Iterable[Norm] | None = None, *, error: str | None = None) -> Norm:
        """The norm ``value`` names; the one parser of norms in marginlab.

        Accepted: a :class:`Norm`; the numbers 1, 2, ``inf`` (int, float, numpy or 0-d tensor scalars, not
        booleans); the strings ``"1"``, ``"2"``, ``"2.0"``, ``"inf"``, ``"infinity"``, ``"∞"``, each also
        with a leading ``"l"``/``"L"`` (``"L2"``, ``"linf"``, ``"L∞"``), case and surrounding blanks ignored.
        ``among``: the norms the caller supports (default: all three); any other value raises a one-line
        :class:`ConfigError` with ``error`` (a template with ``{value!r}``; default: which values work).
        """
        norm = cls._lookup(value)
        allowed = tuple(cls) if among is None else tuple(among)
        if norm is None or norm not in allowed:
            raise ConfigError((error or _DEFAULT_ERROR).format(value=value))
        return norm

    @classmethod
    def _lookup(cls, value: Any) -> Norm | None:
        """The norm ``value`` spells, or None."""
        if isinstance(value, Norm):
            return value
        if isinstance(value, str):
            name = _SPELLINGS.get(value.strip().lower().removeprefix("l"))
            return None if name is None else cls(name)
        if isinstance(value, bool):
            return None
        try:
            order = float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
            return None
        return next((n for n in cls if n.p == order), None)
