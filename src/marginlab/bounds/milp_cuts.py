"""Cuts of the ideal formulation of a ReLU (Anderson et al. 2020, "Strong mixed-integer programming
formulations for trained neural networks") for :class:`marginlab.bounds.milp.MilpProgram`.

The big-M encoding of ``a = max(0, w . x + b)`` with ``L <= x <= U`` and one binary ``s`` is weak: its
linear relaxation is the triangle over the pre-activation, much larger than the convex hull of the
neuron over the box of its inputs. That hull is the big-M constraints plus, for every subset ``I`` of
the inputs,

    a <= sum_{i in I} w_i (x_i - Lb_i (1 - s)) + (b + sum_{i not in I} w_i Ub_i) s,

with ``Lb_i, Ub_i`` the ends of ``[L_i, U_i]`` where ``w_i x_i`` is smallest and largest. Exponentially
many, but the most violated one at a relaxation point ``(x*, a*, s*)`` is found coordinate by coordinate:
``i`` is in ``I`` when ``w_i (x*_i - Lb_i (1 - s*)) < w_i Ub_i s*``. :func:`ideal_separator` adds those
that cut off the current LP point (SCIP calls it in its separation rounds).

Measured on an MNIST 784-64-64-10 MLP (docs/bounds.md): on two hard radius tests alone, separated in the
five root rounds, they shrank SCIP's tree 2.8x and 6.4x (107 s -> 66 s, 106 s -> 46 s); the violated
cuts all came from the first layer, whose inputs are the pixels, so each is a dense row. Over 20 points
(``benchmarks/bench_mip_mnist.py --variant cuts``) those rows slowed every LP more than the smaller trees
saved (CPU time 1.85 min against 1.46 min), so the search leaves them off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

VIOLATION = 1e-6  # absolute: smaller violations are numerical noise, not worth a dense row


@dataclass(frozen=True)
class Neuron:
    """An unstable ReLU of the program: its pre-activation ``w . vars[ids] + b``, with the input bounds
    ``lb, ub`` (per input: where ``w_i x_i`` is smallest, largest), its output ``a`` and binary ``s``
    (indices into the separator's variable list)."""

    ids: np.ndarray
    w: np.ndarray
    b: float
    lb: np.ndarray
    ub: np.ndarray
    a: int
    s: int


class NeuronTable:
    """The unstable ReLUs of one program and the variables they read (each listed once)."""

    def __init__(self) -> None:
        self.vars: list[Any] = []
        self.neurons: list[Neuron] = []
        self._index: dict[int, int] = {}

    def _id(self, var: Any) -> int:
        key = var.ptr()
        if key not in self._index:
            self._index[key] = len(self.vars)
            self.vars.append(var)
        return self._index[key]

    def add(self, z: Any, a: Any, s: Any) -> None:
        """Record ``a = max(0, z)``, binary ``s``; ``z``: a linear expression of bounded variables."""
        terms = [(t.vartuple[0], float(c)) for t, c in z.terms.items() if len(t.vartuple) == 1]
        b = float(sum(c for t, c in z.terms.items() if len(t.vartuple) == 0))
        if not terms:
            return
        w = np.array([c for _, c in terms])
        lo = np.array([v.getLbOriginal() for v, _ in terms])
        hi = np.array([v.getUbOriginal() for v, _ in terms])
        ids = np.array([self._id(v) for v, _ in terms])
        pos = w >= 0
        self.neurons.append(
            Neuron(ids, w, b, np.where(pos, lo, hi), np.where(pos, hi, lo), self._id(a), self._id(s))
        )


def _most_violated(n: Neuron, val: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """``(I as a mask, coefficient of s, right-hand side)`` of the most violated inequality at the LP
    point ``val``, as ``a - sum_I w_i x_i + coef_s s <= rhs``, or ``None`` if none is violated."""
    x, a, s = val[n.ids], val[n.a], val[n.s]
    left, right = n.w * (x - n.lb * (1 - s)), n.w * n.ub * s
    inside = left < right
    if a <= left[inside].sum() + right[~inside].sum() + n.b * s + VIOLATION:
        return None
    wl = float((n.w * n.lb)[inside].sum())
    coef_s = -(wl + n.b + float((n.w * n.ub)[~inside].sum()))
    return inside, coef_s, -wl


def ideal_separator(scip: ModuleType, table: NeuronTable) -> Any:
    """A pyscipopt separator (for ``Model.includeSepa``) adding the most violated ideal cut of every neuron
    of ``table`` that the LP point violates (pyscipopt is optional: the class is made here)."""

    def sepaexeclp(self: Any) -> dict[str, Any]:
        m = self.model
        val = np.array([v.getLPSol() for v in table.vars])
        found = False
        for n in table.neurons:
            cut = _most_violated(n, val)
            if cut is None:
                continue
            inside, coef_s, rhs = cut
            row = m.createEmptyRowSepa(self, "ideal", lhs=None, rhs=rhs, local=False)
            m.cacheRowExtensions(row)
            m.addVarToRow(row, table.vars[n.a], 1.0)
            m.addVarToRow(row, table.vars[n.s], coef_s)
            for i in np.nonzero(inside)[0]:
                m.addVarToRow(row, table.vars[n.ids[i]], -float(n.w[i]))
            m.flushRowExtensions(row)
            m.addCut(row)
            found = True
        return {"result": scip.SCIP_RESULT.SEPARATED if found else scip.SCIP_RESULT.DIDNOTFIND}

    return type("IdealSepa", (scip.Sepa,), {"sepaexeclp": sepaexeclp})()
