"""Model registry: shapes, Φ/head composition, reference layer sizes, options and weight loading."""

import pytest
import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.nets.models import MODELS, MarginNet, build_model, linear_layers, load_weights

# Flattened conv output size of the authors' nets (watml/rob-margin: 3x3 convs without padding):
# MNIST 28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4, so 4*4*64; CIFAR 32 -> ... -> 5, so 5*5*128.
REFERENCE = {
    "mnist-lr": ((1, 28, 28), 784, 784),
    "mnist-mlp": ((1, 28, 28), 784, 1024),
    "mnist-cnn": ((1, 28, 28), 4 * 4 * 64, 200),
    "cifar-lr": ((3, 32, 32), 3072, 3072),
    "cifar-mlp": ((3, 32, 32), 3072, 1024),
    "cifar-cnn": ((3, 32, 32), 5 * 5 * 128, 256),
}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_architecture_maps_images_to_logits_through_phi_and_head(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.rand(3, *model.input_shape)
    feats = model.features(x)
    assert isinstance(model, MarginNet) and isinstance(model.head, nn.Linear)
    assert feats.shape == (3, model.head.in_features)
    assert model(x).shape == (3, model.num_classes) == (3, 10)
    torch.testing.assert_close(model(x), model.head(feats))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_architectures_have_the_authors_layer_sizes(name: str) -> None:
    shape, first_fc_in, feature_dim = REFERENCE[name]
    model = build_model(name)
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert model.input_shape == shape
    assert first_linear.in_features == first_fc_in
    assert model.head.in_features == feature_dim


def test_layer_counts_dropout_and_linear_layers() -> None:
    cnn = build_model("mnist-cnn")
    weights = list(linear_layers(cnn))
    assert [w.ndim for w in weights] == [4, 4, 4, 4, 2, 2, 2]
    assert weights[-1] is cnn.head.weight
    assert not any(isinstance(m, nn.Dropout) for m in cnn.modules())
    drops = [m for m in build_model("cifar-cnn").modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    assert any(isinstance(m, nn.Softplus) for m in build_model("mlp", activation="softplus").modules())


def test_options_shape_and_classes() -> None:
    fashion = build_model("mnist-cnn", input_shape=(1, 28, 28), num_classes=10)
    assert fashion(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    small = build_model("cnn", input_shape=(1, 8, 8), num_classes=3, channels=(4, 4), fc=(16,))
    assert small(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    wide = build_model("mlp", input_shape=(3, 4, 4), num_classes=2, widths=(7, 5))
    assert [m.out_features for m in wide.modules() if isinstance(m, nn.Linear)] == [7, 5, 2]


def test_kaiming_init_draws_he_normal_weights_and_keeps_the_logits_at_scale_one() -> None:
    torch.manual_seed(0)
    default = build_model("mnist-cnn")
    torch.manual_seed(0)
    same = build_model("mnist-cnn", init="default")
    pairs = zip(default.state_dict().values(), same.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    torch.manual_seed(0)
    he = build_model("mnist-cnn", init="kaiming")
    for w in linear_layers(he):  # He et al.: N(0, 2 / fan_in), fan_in = in_channels * kh * kw
        fan_in = w[0].numel()
        assert abs(float(w.std()) / (2 / fan_in) ** 0.5 - 1) < 0.1
    assert all(float(m.bias.abs().max()) == 0 for m in he.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    # the reason for the option: PyTorch's default init shrinks the signal ~sqrt(6)x per ReLU layer
    x = torch.rand(64, 1, 28, 28)
    assert float(default(x).std()) < 0.2 < float(he(x).std())
    mlp = build_model("mnist-mlp", init="kaiming")
    assert abs(float(mlp.head.weight.std()) / (2 / 1024) ** 0.5 - 1) < 0.1


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("no-such-net", {}, "unknown model"),
        ("mnist-mlp", {"width": 3}, "no option 'width'"),
        ("mnist-lr", {"dropout": 0.5}, "no option 'dropout'"),
        ("mlp", {"activation": "gelu"}, "unknown activation"),
        ("cnn", {"input_shape": (1, 8, 8)}, "too small"),
        ("cnn", {"dropout": 1.5}, "dropout"),
        ("mnist-cnn", {"init": "xavier"}, "init"),
        ("lr", {"num_classes": 1}, "num_classes"),
    ],
)
def test_bad_options_raise_config_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(name, **kwargs)


def test_load_weights_round_trip_and_checkpoint_dicts(tmp_path) -> None:
    torch.manual_seed(0)
    src, dst = build_model("mlp", widths=(8,)), build_model("mlp", widths=(8,))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    torch.save({"model_state_dict": src.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    x = torch.rand(4, 1, 28, 28)
    for f in ("w.pt", "ckpt.pt"):
        torch.nn.init.zeros_(dst.head.weight)
        load_weights(dst, tmp_path / f)
        torch.testing.assert_close(dst(x), src(x))


def test_load_weights_errors_name_the_problem(tmp_path) -> None:
    model = build_model("mlp", widths=(8,))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save(build_model("mlp", widths=(9,)).state_dict(), tmp_path / "wide.pt")
    torch.save(build_model("lr").state_dict(), tmp_path / "lr.pt")
    extra = dict(model.state_dict(), **{"phi.9.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {
        "missing.pt": "not found",
        "junk.pt": "cannot read weights file",
        "wide.pt": r"'phi.1.weight' has shape \(9, 784\), expected \(8, 784\)",
        "lr.pt": "missing key 'phi.1.weight'",
        "extra.pt": "unexpected key 'phi.9.weight'",
        "list.pt": "does not hold a PyTorch state_dict",
    }
    for f, match in cases.items():
        with pytest.raises(ConfigError, match=match) as info:
            load_weights(model, tmp_path / f)
        assert "\n" not in str(info.value)
