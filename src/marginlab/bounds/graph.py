"""A network as a directed acyclic graph of :mod:`marginlab.bounds.ops` operations: what bound propagation
and the MILP encoding walk.

A :class:`Graph` holds its nodes in topological order. Node ``i`` applies ``nodes[i].op`` to the outputs
of the nodes ``nodes[i].inputs`` (``-1``: the network's input ``[N, *in_shape]``); the last node's
output is the logits ``[N, K]``. Every operation reads one input except :class:`Add` (two inputs of one
shape: the residual connection ``z = a + b``). A plain stack of layers is a *chain*: node ``i`` reads
node ``i - 1`` (:meth:`Graph.from_ops`, :meth:`Graph.is_chain`), and then node ``i`` is the ``i``-th
operation of the list, so bounds keyed by node index are keyed by layer index too.

Shapes are per sample (no batch axis): ``op.in_shape`` and ``op.out_shape``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from marginlab.bounds.ops import Affine, Op, Shape

INPUT = -1  # the index that names the network's input in ``Node.inputs``


@dataclass(frozen=True)
class Add:
    """``z = a + b`` for two inputs of per-sample ``shape`` (a residual connection); linear and exact."""

    shape: Shape

    @property
    def in_shape(self) -> Shape:
        """The shape of each of the two inputs."""
        return self.shape

    @property
    def out_shape(self) -> Shape:
        """The shape of the sum."""
        return self.shape


@dataclass(frozen=True)
class Node:
    """One operation and the indices of the nodes it reads (``INPUT`` = -1: the network's input).

    ``name``: where it came from in the user's model (``"layer1.0.conv1"``, ``"add"``), for messages.
    """

    op: Op | Add
    inputs: tuple[int, ...]
    name: str = ""


@dataclass(frozen=True)
class Graph:
    """The nodes of a network in topological order; ``nodes[-1]`` gives the logits ``[N, K]``."""

    in_shape: Shape
    nodes: tuple[Node, ...]

    def __post_init__(self) -> None:
        for i, node in enumerate(self.nodes):
            want = 2 if isinstance(node.op, Add) else 1
            if len(node.inputs) != want or any(not INPUT <= j < i for j in node.inputs):
                raise ValueError(f"node {i} ({node.name or type(node.op).__name__}) has inputs {node.inputs}")

    @classmethod
    def from_ops(cls, ops: Sequence[Op], in_shape: Sequence[int]) -> Graph:
        """The chain ``ops[-1] ∘ ... ∘ ops[0]`` on inputs ``[N, *in_shape]``."""
        nodes = tuple(Node(op, (i - 1,), type(op).__name__) for i, op in enumerate(ops))
        return cls(tuple(int(s) for s in in_shape), nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def num_classes(self) -> int:
        """The number of logits."""
        return int(self.nodes[-1].op.out_shape[0])

    def is_chain(self) -> bool:
        """Whether node ``i`` reads node ``i - 1`` for every ``i`` (no branches, no :class:`Add`)."""
        return all(node.inputs == (i - 1,) for i, node in enumerate(self.nodes))

    def chain(self) -> list[Op]:
        """The operations in order, for a chain (``ValueError`` for a graph with branches)."""
        if not self.is_chain():
            raise ValueError("this network has branches (residual connections); it is not a chain")
        return [node.op for node in self.nodes if isinstance(node.op, Op)]  # a chain holds no Add

    def users(self) -> list[list[int]]:
        """For every node, the indices of the nodes that read its output."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                if j != INPUT:
                    out[j].append(i)
        return out

    def input_shape_of(self, i: int) -> Shape:
        """The per-sample shape of node ``i``'s (first) input."""
        j = self.nodes[i].inputs[0]
        return self.in_shape if j == INPUT else self.nodes[j].op.out_shape

    def forward(self, x: Tensor) -> Tensor:
        """The logits ``[N, K]`` of ``x [N, *in_shape]`` (float64; affine and ReLU/max-pool ops only
        through their own ``forward``): a check that the graph computes what the model computes."""
        outs: list[Tensor] = []
        x = x.double().reshape(len(x), *self.in_shape)
        for node in self.nodes:
            args = [x if j == INPUT else outs[j] for j in node.inputs]
            outs.append(_apply(node.op, args))
        return outs[-1]


def _apply(op: Op | Add, args: list[Tensor]) -> Tensor:
    """One node's output from its inputs (each ``[N, *shape]``)."""
    if isinstance(op, Add):
        return args[0] + args[1]
    if isinstance(op, Affine):
        return op.forward(args[0])
    lo = args[0]
    out, _ = op.ibp(lo, lo)  # a nonlinear op on a degenerate interval is the op itself
    return out


def as_graph(network: Graph | Sequence[Op], in_shape: Sequence[int] | None = None) -> Graph:
    """``network`` itself, or the chain of a list of ops (``in_shape`` defaults to the first op's)."""
    if isinstance(network, Graph):
        return network
    ops = list(network)
    return Graph.from_ops(ops, in_shape if in_shape is not None else ops[0].in_shape)
