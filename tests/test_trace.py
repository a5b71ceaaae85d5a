"""Any model for bound propagation (``bounds/network.py``, ``bounds/trace.py``): a user's own ``nn.Module``
is traced by torch.fx into the graph of operations, which must compute what the model computes (checked
here on fresh inputs, independently of the tracer's own check); a Sequential / MarginNet still gives its
chain, identical to what a second reader (the tracer) finds; every unsupported call is one line naming
it and where it is."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.bounds.graph import Add, Graph
from marginlab.bounds.network import network_graph, network_ops
from marginlab.bounds.ops import Conv, Dense, MaxPool, Op, ReLU, Reshape, Scale
from marginlab.bounds.trace import trace_graph
from marginlab.cli import main
from marginlab.data import load_dataset
from marginlab.estimators import build_estimator
from marginlab.nets.loading import load_model
from marginlab.nets.models import build_model
from marginlab.nets.preprocess import Normalize


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters (a fresh BatchNorm is the identity)."""
    gen = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)
    return model


class FunctionalCNN(nn.Module):
    """A CNN written in forward: F.relu, F.max_pool2d, x.view(x.size(0), -1), a log_softmax at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding="same")
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 16), nn.Linear(16, 5)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        x = F.dropout(self.fc1(x).relu(), 0.5, training=self.training)
        return F.log_softmax(self.fc2(self.drop(x)), dim=1)


class Block(nn.Module):
    """A ResNet basic block: conv-BN-relu-conv-BN plus the shortcut (1x1 conv + BN when it downsamples)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """Stem, two blocks (one downsampling), global average pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(Block(4, 4, 1), Block(4, 6, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class NormalizeFirst(nn.Module):
    """Normalises in forward with its own buffers, then an MLP through nn.Flatten and a functional mean."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.3, 0.6]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.4]).view(1, 2, 1, 1))
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std * 2.0 + 1.0
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3))) - 0.5


class AdaptivePool(nn.Module):
    """AdaptiveAvgPool2d(2) on 6x6 maps (an exact 3x3 average pooling), BatchNorm1d, x - y of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.bn = nn.BatchNorm1d(12)
        self.a, self.b, self.head = nn.Linear(12, 4), nn.Linear(12, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.pool(F.relu(self.conv(x))).flatten(1))
        return self.head(self.a(h) - self.b(F.relu(h)))


# model, input shape, the graph's node types and inputs (what bound propagation and the MILP will see)
USER_MODELS = {
    "functional-cnn": (FunctionalCNN, (1, 8, 8), [
        (Conv, -1), (ReLU, 0), (MaxPool, 1), (Conv, 2), (ReLU, 3), (Reshape, 4), (Dense, 5), (ReLU, 6),
        (Dense, 7)]),
    "resnet-block": (ResNet, (2, 6, 6), [
        (Conv, -1), (Scale, 0), (ReLU, 1),  # stem
        (Conv, 2), (Scale, 3), (ReLU, 4), (Conv, 5), (Scale, 6), (Add, (7, 2)), (ReLU, 8),  # identity
        (Conv, 9), (Scale, 10), (ReLU, 11), (Conv, 12), (Scale, 13), (Conv, 9), (Scale, 15),
        (Add, (14, 16)), (ReLU, 17),  # a block whose shortcut downsamples (1x1 conv + BN)
        (Conv, 18), (Reshape, 19), (Dense, 20)]),
    "normalize-first": (NormalizeFirst, (2, 5, 5), [
        (Scale, -1), (Conv, 0), (ReLU, 1), (Conv, 2), (Reshape, 3), (Dense, 4), (Scale, 5)]),
    "adaptive-pool": (AdaptivePool, (1, 6, 6), [
        (Conv, -1), (ReLU, 0), (Conv, 1), (Reshape, 2), (Scale, 3), (Dense, 4), (ReLU, 4), (Dense, 6),
        (Scale, 7), (Add, (5, 8)), (Dense, 9)]),
}  # fmt: skip


def _forward_matches(graph: Graph, model: nn.Module, shape: tuple[int, ...], seed: int = 11) -> None:
    """The graph computes the model's logits (up to a final log_softmax, which keeps every difference)."""
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(x)
    got = graph.forward(x)
    diff = (got - got[:, :1]) - (want - want[:, :1])  # logit differences decide every margin
    assert diff.abs().max() < 1e-9 * (1 + want.abs().max())


@pytest.mark.parametrize("name", sorted(USER_MODELS))
def test_user_models_become_graphs_that_compute_the_model(name: str) -> None:
    cls, shape, expected = USER_MODELS[name]
    torch.manual_seed(0)
    model = _randomize_batchnorm(cls()).eval()
    graph = network_graph(model, shape)
    got = [(type(n.op), n.inputs[0] if len(n.inputs) == 1 else n.inputs) for n in graph.nodes]
    assert got == expected
    assert all(n.name for n in graph.nodes)
    _forward_matches(graph, model, shape)
    if name == "resnet-block":  # nodes are named after the module paths, residual additions too
        names = [n.name for n in graph.nodes]
        assert "layer1.0.bn1" in names and "layer1.1.shortcut.0" in names and "layer1.0.add" in names
        with pytest.raises(ConfigError, match=r"ResNet has residual connections \(layer1\.0\.add\)"):
            network_ops(model, shape)
    else:
        assert graph.is_chain() == (name != "adaptive-pool")


def _same_ops(a: list[Op], b: list[Op], rtol: float = 0.0) -> None:
    """The same operations: types, shapes, weights (to ``rtol``), kernels and strides."""
    assert [type(op) for op in a] == [type(op) for op in b]
    for x, y in zip(a, b, strict=True):
        assert (x.in_shape, x.out_shape) == (y.in_shape, y.out_shape)
        for attr in ("w", "bias", "s", "kernel", "stride"):
            if hasattr(x, attr):
                u, v = getattr(x, attr), getattr(y, attr)
                assert torch.allclose(u, v, rtol=rtol, atol=rtol) if isinstance(u, torch.Tensor) else u == v


def test_sequential_and_marginnet_give_their_chain_as_before() -> None:
    torch.manual_seed(0)
    mlp = build_model("mlp", input_shape=(1, 4, 4), num_classes=3, widths=(6, 5))
    cnn = build_model("cnn", input_shape=(2, 10, 10), num_classes=4, channels=(3, 4), fc=(10,), pool_every=1)
    seq = nn.Sequential(Normalize([0.5, 0.4], [0.25, 0.3]), nn.Conv2d(2, 3, 3, padding=1, stride=2),
                        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))  # fmt: skip
    for model, shape in ((mlp, (1, 4, 4)), (cnn, (2, 10, 10)), (seq, (2, 8, 8))):
        model.eval()
        chain = network_ops(model, shape)
        _same_ops(network_graph(model, shape).chain(), chain)  # the very same operations
        _same_ops(trace_graph(model, shape).chain(), chain, rtol=1e-12)  # a second, independent reader agrees
    # the layers themselves, in order, with the module's own weights
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    ops = network_ops(mlp, (1, 4, 4))
    assert [type(op) for op in ops] == [Reshape, Dense, ReLU, Dense, ReLU, Dense]
    assert all(torch.equal(op.w, lin.weight.double()) for op, lin in zip(ops[1::2], linears, strict=True))
    assert [n.name for n in network_graph(cnn, (2, 10, 10)).nodes][-2:] == ["phi.8", "head"]  # module paths


NET_PY = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A chain written in forward (not an nn.Sequential): conv, relu, flatten, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.fc1 = nn.Linear(36, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))
'''


def test_a_model_loaded_from_a_python_file_converts(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(NET_PY)
    pre = {"mean": [0.5], "std": [0.25]}
    loaded = load_model(f"{tmp_path}/net.py:Net", None, num_classes=10, input_shape=(1, 8, 8), preprocess=pre)
    graph = network_graph(loaded.model, (1, 8, 8))  # Sequential(normalize, Net): traced, not read as leaves
    assert [type(n.op) for n in graph.nodes] == [Scale, Conv, ReLU, Reshape, Dense, ReLU, Dense]
    assert graph.nodes[0].name.startswith("normalize") and graph.nodes[1].name == "model.conv"
    _forward_matches(graph, loaded.model, (1, 8, 8))


class _Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))


class _Unsupported(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.layer2, self.bn, self.fc = how, _Sigmoid(), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.how == "sigmoid":
            x = self.layer2(x)
        elif self.how == "slice":
            x = torch.cat([x[:, :2], x[:, 2:]], dim=1)
        elif self.how == "data-dependent":
            if x.sum() > 0:
                x = x * 2
        elif self.how == "product":
            x = x * x
        elif self.how == "random-dropout":
            x = F.dropout(x, 0.5)
        elif self.how == "batchnorm":
            x = self.bn(x)
        return self.fc(x)


ERRORS = {
    "sigmoid": r"^bound propagation cannot handle torch\.sigmoid at layer2 \(in _Sigmoid\.forward\); ",
    "slice": r"^bound propagation cannot handle indexing \(x\[\.\.\.\]\) in _Unsupported\.forward; supported",
    "data-dependent": r"^cannot trace _Unsupported\.forward with torch\.fx .*control flow.*nn\.Sequential$",
    "product": r"^bound propagation cannot handle operator\.mul in _Unsupported\.forward",
    "random-dropout": r"^dropout with training=True is random.* \(in _Unsupported\.forward\)$",
    "batchnorm": r"^BatchNorm1d is in training mode .*\.eval\(\) first \(at bn in _Unsupported\.forward\)$",
}


@pytest.mark.parametrize("how", sorted(ERRORS))
def test_unsupported_calls_are_one_line_naming_the_call_and_where(how: str) -> None:
    model = _Unsupported(how)
    if how != "batchnorm":
        model.eval()  # batchnorm: left in training mode, where it normalises by the batch
    with pytest.raises(ConfigError, match=ERRORS[how]) as info:
        network_graph(model, (1, 2, 2))
    assert "\n" not in str(info.value)


def test_torch_cat_is_named() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.cat([x, x], dim=1).flatten(1))

    with pytest.raises(ConfigError, match=r"cannot handle torch\.cat in Cat\.forward"):
        network_graph(Cat().eval(), (1, 2, 2))


def test_a_batch_size_written_into_forward_is_caught() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.view(2, 4))  # right for the probe's 2 points only

    with pytest.raises(ConfigError, match="traced graph of Fixed does not reproduce its output"):
        network_graph(Fixed().eval(), (1, 2, 2))


def test_crown_certifies_the_same_radii_for_a_user_chain_as_for_its_sequential() -> None:
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.net[1](x.view(x.size(0), -1)))
            return self.net[3](h)

    model = Chain().eval()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    crown = build_estimator("crown", warm_start=False)
    ours, ref = crown(model, x, y, p=2), crown(model.net, x, y, p=2)
    assert torch.equal(ours, ref) and (ours > 0).all()


def test_margins_cli_certifies_a_user_class_with_crown(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(NET_PY)
    out = tmp_path / "m"
    argv = ["margins", "--model", f"{tmp_path}/net.py:Net", "--data", "digits", "--n", "6", "--seed", "1",
            "--estimators", "crown", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with open(out / "margins.csv") as f:
        rows = list(csv.DictReader(f))
    column = {name.split("[")[0]: name for name in rows[0]}  # "crown" or "crown[box]" (the domain)
    crown = torch.tensor([float(r[column["crown"]]) for r in rows], dtype=torch.float64)
    # the same as crown on the same model from Python (the class's own seed fixes its weights)
    model = load_model(f"{tmp_path}/net.py:Net", None, num_classes=10, input_shape=(1, 8, 8)).model
    data = load_dataset("digits", "test", n=6, seed=1)
    ref = build_estimator("crown")(model, data.x, data.y, p=2)
    torch.testing.assert_close(crown, ref, rtol=1e-6, atol=1e-9)
    assert (crown.abs() > 0).all()
