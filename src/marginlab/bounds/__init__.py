"""Certified bounds on a ReLU network's logits over a set of inputs, and its exact encoding as a MILP.

- :mod:`~marginlab.bounds.domain`: the input sets (an Lp ball, optionally inside the image box) and the
  minimum of a linear function over them;
- :mod:`~marginlab.bounds.ops`: the layers as operations with their interval images and linear
  relaxations;
- :mod:`~marginlab.bounds.graph`: a network as a directed acyclic graph of those operations (``Add`` for
  residual connections);
- :mod:`~marginlab.bounds.network`, :mod:`~marginlab.bounds.layers`, :mod:`~marginlab.bounds.trace`,
  :mod:`~marginlab.bounds.trace_calls`: a PyTorch module as that graph (MarginNet / ``nn.Sequential``
  directly, any other module through torch.fx);
- :mod:`~marginlab.bounds.crown` (with :mod:`~marginlab.bounds.backsub`, :mod:`~marginlab.bounds.windows`,
  :mod:`~marginlab.bounds.alpha`): linear bound propagation (CROWN / DeepPoly) with back-substitution,
  through convolutions by receptive-field windows, and optimised slopes (alpha-CROWN);
- :mod:`~marginlab.bounds.milp`: the network as a mixed-integer program for SCIP.

In marginlab 0.1 ``marginlab.bounds`` was one module; its names still resolve here, with a
:class:`DeprecationWarning` (:data:`marginlab.base.deprecated.MOVED_NAMES`).
"""

from typing import Any

from marginlab.base.deprecated import moved_attribute


def __getattr__(name: str) -> Any:
    """The names of the 0.1 module ``marginlab.bounds`` (``lower_bounds`` ...): deprecated aliases."""
    return moved_attribute(__name__, name)
