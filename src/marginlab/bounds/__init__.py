"""Certified bounds on a ReLU network's logits over a set of inputs, and its exact encoding as a MILP.

- :mod:`~marginlab.bounds.domain`: the input sets (an Lp ball, optionally inside the image box) and the
  minimum of a linear function over them;
- :mod:`~marginlab.bounds.ops`: the layers as operations with their interval images and linear
  relaxations;
- :mod:`~marginlab.bounds.network`: a PyTorch network as that list of operations;
- :mod:`~marginlab.bounds.crown`: linear bound propagation (CROWN / DeepPoly) with interval bounds;
- :mod:`~marginlab.bounds.milp`: the network as a mixed-integer program for SCIP.

In marginlab 0.1 ``marginlab.bounds`` was one module; its names still resolve here, with a
:class:`DeprecationWarning` (:data:`marginlab.base.deprecated.MOVED_NAMES`).
"""

from typing import Any

from marginlab.base.deprecated import moved_attribute


def __getattr__(name: str) -> Any:
    """The names of the 0.1 module ``marginlab.bounds`` (``lower_bounds`` ...): deprecated aliases."""
    return moved_attribute(__name__, name)
