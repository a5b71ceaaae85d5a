"""A PyTorch network as the :class:`~marginlab.bounds.graph.Graph` of operations that bound propagation
and the MILP encoding walk (:func:`network_graph`), or as the list of operations of a chain
(:func:`network_ops`).

Two readers, one result:

- a :class:`~marginlab.nets.models.MarginNet` (``phi`` then ``head``) or an ``nn.Sequential``, nested
  freely, whose leaves are all layers of :mod:`marginlab.bounds.layers`: read leaf by leaf, in order,
  as a chain (the fast path; no tracing, no probe);
- any other module (the user's own class with its ``forward``, a ``Sequential`` holding one):
  traced by ``torch.fx`` (:mod:`marginlab.bounds.trace`), which also reads residual connections
  (:class:`~marginlab.bounds.graph.Add`) and the functional forms (``F.relu``, ``x.view(len(x), -1)``...),
  and checked against the model's own output.

Anything else is a one-line :class:`ConfigError` naming the operation and where it is; the last
operation must be affine (the logits).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.graph import Add, Graph, Node
from marginlab.bounds.layers import SUPPORTED, is_known, module_op
from marginlab.bounds.ops import Affine, Op, Shape
from marginlab.bounds.trace import trace_graph
from marginlab.nets.models import MarginNet

__all__ = ["SUPPORTED", "chain_leaves", "network_graph", "network_ops"]


def chain_leaves(module: nn.Module, path: str = "") -> list[tuple[str, nn.Module]]:
    """``(path, leaf)`` of a MarginNet or (nested) ``nn.Sequential`` in the order they run: the walk
    descends only into containers whose ``forward`` is the stock one; any other module (a layer, or a
    container with its own ``forward``) is a leaf, for the caller to accept or refuse."""
    dot = f"{path}." if path else ""
    if isinstance(module, MarginNet) and type(module).forward is MarginNet.forward:
        parts = [(f"{dot}phi", module.phi), (f"{dot}head", module.head)]
    elif isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        parts = [(f"{dot}{name}", child) for name, child in module.named_children()]
    else:
        return [(path, module)]
    return [leaf for name, child in parts for leaf in chain_leaves(child, name)]


def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """:func:`chain_leaves` when every leaf is a known layer, else ``None`` (then: trace the model)."""
    leaves = chain_leaves(module)
    return leaves if all(is_known(m) for _, m in leaves) else None


def _chain(leaves: list[tuple[str, nn.Module]], in_shape: Sequence[int]) -> list[tuple[Op, str]]:
    """The operations of known leaves, in order, on inputs ``[N, *in_shape]``, each with its module path."""
    ops: list[tuple[Op, str]] = []
    shape: Shape = tuple(int(s) for s in in_shape)
    for path, module in leaves:
        try:
            op = module_op(module, shape)
        except ConfigError as e:
            raise ConfigError(f"{e} (at {path or type(module).__name__})") from None
        if op is not None:
            ops.append((op, path or type(op).__name__))
            shape = op.out_shape
    if not ops or not isinstance(ops[-1][0], Affine):
        raise ConfigError("bound propagation needs a network ending in a linear layer")
    return ops


def network_graph(model: nn.Module, in_shape: Sequence[int]) -> Graph:
    """The :class:`~marginlab.bounds.graph.Graph` of ``model`` on inputs ``[N, *in_shape]`` (float64, CPU).

    A MarginNet or ``nn.Sequential`` of known layers: the chain of its layers. Anything else: traced by
    ``torch.fx`` (:func:`marginlab.bounds.trace.trace_graph`). Put the model in eval mode first (the
    estimators do): batch norm and dropout in training mode are refused.
    """
    leaves = _leaves(model)
    if leaves is not None:
        nodes = tuple(Node(op, (i - 1,), name) for i, (op, name) in enumerate(_chain(leaves, in_shape)))
        return Graph(tuple(int(s) for s in in_shape), nodes)
    return trace_graph(model, in_shape)


def network_ops(model: nn.Module, in_shape: Sequence[int]) -> list[Op]:
    """The operations of ``model`` on inputs ``[N, *in_shape]`` when it is a chain (no residual
    connections): ``f = ops[-1] ∘ ... ∘ ops[0]``. A MarginNet or ``nn.Sequential`` gives its layers as
    before; other modules are traced (:func:`network_graph`)."""
    leaves = _leaves(model)
    if leaves is not None:
        return [op for op, _ in _chain(leaves, in_shape)]
    graph = trace_graph(model, in_shape)
    if not graph.is_chain():
        add = next((node.name for node in graph.nodes if isinstance(node.op, Add)), "a branch")
        raise ConfigError(f"{type(model).__name__} has residual connections ({add}); this bound "
                          "propagation handles chains of layers only")  # fmt: skip
    return graph.chain()
