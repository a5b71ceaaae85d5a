"""Any traceable PyTorch module as a :class:`~marginlab.bounds.graph.Graph`, by ``torch.fx``.

``torch.fx.symbolic_trace`` records ``forward`` as a graph of calls (modules, functions, tensor methods);
it runs no data, keeps the module paths (``layer1.0.conv1``) for messages, and stops at the layers of
``torch.nn``. The recorded graph is then run once on a seeded probe ``[2, *in_shape]`` in float64
(a CPU copy of the model), which gives every value's shape and the constants (``x.size(0)``, buffers).
Each call that reads the input (directly or not) becomes operations of :mod:`marginlab.bounds.ops`:

- a ``torch.nn`` layer: :func:`marginlab.bounds.layers.module_op` (``Linear`` -> Dense, ``BatchNorm``
  -> Scale, ...); its functional form (``F.linear``, ``F.conv2d``, ``F.batch_norm``, ``F.max_pool2d``,
  ``F.avg_pool2d``, ``F.adaptive_avg_pool2d``) alike; ``F.relu`` / ``torch.relu`` / ``x.relu()`` -> ReLU;
- ``view`` / ``reshape`` / ``flatten`` / ``squeeze`` / ``unsqueeze`` keeping the batch axis -> Reshape
  (the identity when the shape stays); ``contiguous``, ``clone``, dropout in eval mode -> nothing;
- ``x + y`` / ``x - y`` of two traced tensors of one shape -> :class:`~marginlab.bounds.graph.Add`
  (``x - y``: after a Scale by -1); a traced tensor plus, minus, times or divided by a constant (a
  number or a tensor that broadcasts within one sample) -> Scale; ``x @ W`` for a constant ``W`` ->
  Dense; ``x.mean((2, 3))`` -> global average pooling (a Conv, then a Reshape);
- ``x.size()``, ``x.shape``, ``x.dim()`` -> constants (shapes only; a batch-size-dependent shape is
  caught by the final check, which runs another batch size);
- a final ``softmax`` / ``log_softmax`` over the classes -> dropped: it keeps the order of the logits,
  so the decision boundaries, and with them every margin, are the same.

Consecutive Scales are merged (``(x - mean) / std`` is one Scale). Anything else is a one-line
:class:`ConfigError` naming the call and where it is (module path and class). Finally the graph must
reproduce the model's output on another seeded probe ``[3, *in_shape]`` in float64 (``rtol`` 1e-6).
``torch.export`` is not used: it lowers to ATen operators (a second, larger table to map), needs
dynamic shapes declared, is far slower, and refuses data-dependent control flow just the same.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.graph import INPUT, Add, Graph, Node
from marginlab.bounds.ops import Affine, Op, Scale, Shape
from marginlab.bounds.trace_calls import SUPPORTED_CALLS, Traced, call_key, convert_call, is_shape_query
from marginlab.nets.usercode import first_line

RTOL = 1e-6  # the graph must reproduce the model's float64 output to this (relative to the logits' scale)
_LAST = {"softmax": F.softmax, "log_softmax": F.log_softmax}  # order-keeping last calls, dropped


def trace_graph(model: nn.Module, in_shape: Sequence[int]) -> Graph:
    """The graph of ``model``'s ``forward`` on inputs ``[N, *in_shape]`` (see the module docstring).

    The model should be in eval mode (batch norm and dropout in training mode are refused); it is not
    changed (a float64 CPU copy is traced). :class:`ConfigError` (one line) for what cannot be traced,
    an unsupported call, or a graph that does not reproduce the model's output.
    """
    shape: Shape = tuple(int(s) for s in in_shape)
    root = type(model).__name__
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError("bound propagation cannot read a TorchScript model: give its Python class "
                          "(--model FILE.py:Class) and its weights instead")  # fmt: skip
    model64 = _float64_copy(model)
    gm = _symbolic_trace(model64, root)
    values = _run(gm, _probe(2, shape, 0), root)
    result, last = _result(gm, values, root)
    graph = _Converter(gm, values, shape, root).convert(result)
    _check(graph, model64, last, shape, root)
    return graph


def _probe(n: int, shape: Shape, seed: int) -> Tensor:
    """``[n, *shape]`` uniform in [0, 1], float64, seeded."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 CPU copy: tracing and checking in float64 leave the model as it is."""
    try:
        return copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    except Exception as e:
        raise ConfigError(f"cannot copy {type(model).__name__} to trace it: {first_line(e)}") from None


def _symbolic_trace(model: nn.Module, root: str) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``; what it cannot trace is one line saying what to do."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # the user's code: data-dependent branches, len(x), non-torch calls...
        why = "len(x) of a tensor: write x.size(0)" if "'len'" in str(e) else first_line(e)
        raise ConfigError(
            f"cannot trace {root}.forward with torch.fx for bound propagation ({why}): make forward "
            "traceable (no Python if/for on tensor values) or give the model as an nn.Sequential"
        ) from None


def _run(gm: fx.GraphModule, probe: Tensor, root: str) -> dict[fx.Node, Any]:
    """Every node's value on ``probe`` (the interpreter keeps them all)."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad():
            interpreter.run(probe)
    except Exception as e:
        dims = ", ".join(str(s) for s in probe.shape[1:])
        raise ConfigError(f"{root} fails on inputs [N, {dims}] in float64: {first_line(e)}") from None
    return interpreter.env


def _result(
    gm: fx.GraphModule, values: dict[fx.Node, Any], root: str
) -> tuple[fx.Node, Callable[[Tensor], Tensor] | None]:
    """The node of the logits ``[N, K]`` and the order-keeping last call dropped after it (or None)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node) or not isinstance(values.get(result), Tensor):
        raise ConfigError(f"{root}.forward must return one tensor of logits for bound propagation")
    last = None
    key = call_key(result)
    if key in _LAST and values[result].dim() == 2:
        dim = result.kwargs.get("dim", result.args[1] if len(result.args) > 1 else None)
        if dim in (1, -1, None) and isinstance(result.args[0], fx.Node):
            last, result = _LAST[key], result.args[0]
    if values[result].dim() != 2:
        got = list(values[result].shape)
        raise ConfigError(f"{root}.forward returns a tensor of shape {got}; bound propagation needs [N, K]")
    return result, (None if last is None else lambda z: last(z, dim=1))


def where(n: fx.Node, root: str, *, inner: bool = False) -> str:
    """Where a call is: ``"at layer1.act (in Block.forward)"`` (its module path and the class whose
    ``forward`` makes it) or ``"in Net.forward"``; ``inner``: for inside parentheses."""
    stack = list(n.meta.get("nn_module_stack", {}).values())  # [(path, class), ...], outermost first
    if n.op == "call_module":
        path, caller = str(n.target), _class_name(stack[-2][1]) if len(stack) > 1 else root
    elif stack:
        path, caller = str(stack[-1][0]), _class_name(stack[-1][1])
    else:
        path, caller = "", root
    if not path:
        return f"in {caller}.forward"
    return f"at {path} in {caller}.forward" if inner else f"at {path} (in {caller}.forward)"


def _class_name(cls: Any) -> str:
    return str(getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1]))


def _node_name(n: fx.Node) -> str:
    """A node's name in the graph: the module path of a layer, else ``path.fx_name``."""
    if n.op == "call_module":
        return str(n.target)
    stack = list(n.meta.get("nn_module_stack", {}).values())
    return f"{stack[-1][0]}.{n.name}" if stack else n.name


class _Converter:
    """Walks the recorded calls in order and emits the graph's nodes (``traced``: fx node -> value)."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any], shape: Shape, root: str) -> None:
        self.gm, self.values, self.shape, self.root = gm, values, shape, root
        self.nodes: list[Node] = []
        self.traced: dict[fx.Node, Traced] = {}
        self.batch = 0  # the probe's batch size

    def convert(self, result: fx.Node) -> Graph:
        """The graph whose last node computes ``result`` (only the calls it depends on are read)."""
        live = _ancestors(result)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.traced[placeholders[0]] = Traced(INPUT, self.shape)
        self.batch = len(self.values[placeholders[0]])
        for n in self.gm.graph.nodes:
            if n in live and n.op in ("call_module", "call_function", "call_method"):
                self._node(n)
        if result not in self.traced or self.traced[result].index == INPUT:
            raise ConfigError(f"the output of {self.root} does not come from layers applied to its input")
        nodes = _compact(self.nodes, self.traced[result].index)
        last = nodes[-1]
        if not isinstance(last.op, Affine):
            raise ConfigError(f"bound propagation needs a network ending in a linear layer; {self.root} ends "
                              f"in {type(last.op).__name__} at {last.name}")  # fmt: skip
        return Graph(self.shape, nodes)

    def _node(self, n: fx.Node) -> None:
        if not any(a in self.traced for a in n.all_input_nodes):
            return  # a constant: its value on the probe is used
        value = self.values[n]
        if not isinstance(value, Tensor):
            if is_shape_query(n):
                return  # a shape (per-sample sizes are the same on every input)
            raise self.unsupported(n)
        if value.dim() == 0 or value.shape[0] != self.batch:
            raise ConfigError(f"{self.describe(n)} {where(n, self.root)} mixes the samples of a batch "
                              f"(shape {list(value.shape)}); bound propagation needs it kept")  # fmt: skip
        args = fx.node.map_arg(n.args, self._value)
        kwargs = fx.node.map_arg(n.kwargs, self._value)
        module = self.gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        try:
            out = convert_call(call_key(n), module, args, kwargs, tuple(value.shape[1:]), self._emit(n))
        except ConfigError as e:
            raise ConfigError(f"{e} ({where(n, self.root, inner=True)})") from None
        if out is None:
            raise self.unsupported(n)
        if out.shape != tuple(value.shape[1:]):
            raise ConfigError(f"{self.describe(n)} {where(n, self.root)} gives per-sample shape "
                              f"{list(value.shape[1:])}, its operation {list(out.shape)}")  # fmt: skip
        self.traced[n] = out

    def _value(self, a: fx.Node) -> Any:
        return self.traced[a] if a in self.traced else self.values[a]

    def _emit(self, n: fx.Node) -> Callable[[Op | Add, tuple[Traced, ...]], Traced]:
        """A function that appends one node (named after ``n``) and returns its traced value."""

        def emit(op: Op | Add, inputs: tuple[Traced, ...]) -> Traced:
            for t in inputs:
                if t.shape != op.in_shape:
                    raise ConfigError(f"{self.describe(n)} reads per-sample shape {list(t.shape)}; bound "
                                      f"propagation supports it on {list(op.in_shape)}")  # fmt: skip
            self.nodes.append(Node(op, tuple(t.index for t in inputs), _node_name(n)))
            return Traced(len(self.nodes) - 1, op.out_shape)

        return emit

    def describe(self, n: fx.Node) -> str:
        """The call's name for a message: ``Sigmoid``, ``torch.cat``, ``Tensor.sum``."""
        if n.op == "call_module":
            return type(self.gm.get_submodule(str(n.target))).__name__
        if n.op == "call_method":
            return f"Tensor.{n.target}"
        if n.target is operator.getitem:
            return "indexing (x[...])"
        if n.target is getattr and len(n.args) > 1:
            return f"Tensor.{n.args[1]}"
        module = str(getattr(n.target, "__module__", "") or "")
        module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional", "builtins": ""}.get(
            module, module
        )
        name = str(getattr(n.target, "__name__", n.target))
        return f"{module}.{name}" if module else name

    def unsupported(self, n: fx.Node) -> ConfigError:
        """The one-line error for a call bound propagation cannot read."""
        return ConfigError(f"bound propagation cannot handle {self.describe(n)} {where(n, self.root)}; "
                           f"supported: {SUPPORTED_CALLS}")  # fmt: skip


def _ancestors(result: fx.Node) -> set[fx.Node]:
    """``result`` and every node it depends on."""
    seen, todo = {result}, [result]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _compact(nodes: list[Node], out: int) -> tuple[Node, ...]:
    """The nodes ``out`` depends on, renumbered, with each Scale read only by the next Scale merged into it
    (``s2 (s1 x + c1) + c2 = (s1 s2) x + (s2 c1 + c2)``); ``out`` comes last."""
    live = {out}
    for i in range(out, -1, -1):
        if i in live:
            live.update(j for j in nodes[i].inputs if j != INPUT)
    users = [0] * len(nodes)
    for i in live:
        for j in nodes[i].inputs:
            if j != INPUT:
                users[j] += 1
    kept: list[Node] = []
    new: dict[int, int] = {INPUT: INPUT}
    for i in sorted(live):
        node = nodes[i]
        j = node.inputs[0]
        inner = kept[new[j]] if j != INPUT else None
        if isinstance(node.op, Scale) and inner is not None and isinstance(inner.op, Scale) and users[j] == 1:
            s = inner.op.s * node.op.s
            c = inner.op.bias * node.op.s + node.op.bias
            kept[new[j]] = Node(Scale(s, c, node.op.in_shape), inner.inputs, inner.name)
            new[i] = new[j]
            continue
        kept.append(Node(node.op, tuple(new[k] for k in node.inputs), node.name))
        new[i] = len(kept) - 1
    return tuple(kept)


def _check(
    graph: Graph, model64: nn.Module, last: Callable[[Tensor], Tensor] | None, shape: Shape, root: str
) -> None:
    """The graph reproduces ``model64`` on another probe (another batch size, too), else one line."""
    x = _probe(3, shape, 1)
    try:
        with torch.no_grad():
            want = model64(x)
    except Exception as e:  # e.g. a batch size written into forward
        why = f"{root} fails on a batch of 3 ({first_line(e)}); is a batch size written into forward?"
        raise ConfigError(f"the traced graph of {root} does not reproduce its output: {why}") from None
    got = graph.forward(x)
    got = last(got) if last is not None else got
    scale = 1.0 + float(want.abs().max()) if want.numel() else 1.0
    if got.shape != want.shape or not torch.allclose(got, want.double(), rtol=RTOL, atol=RTOL * scale):
        gap = float((got - want).abs().max()) if got.shape == want.shape else float("nan")
        raise ConfigError(
            f"the traced graph of {root} does not reproduce its output (largest difference {gap:.2g}): "
            "values computed from the data (x.max().item()) or in-place changes of a tensor used twice?"
        )
