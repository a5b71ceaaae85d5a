"""Models and weights from anywhere through ``marginlab margins``: a Python file, TorchScript, ONNX (with the
extra), nested / DataParallel / renamed checkpoints and input normalisation. Each loads through the CLI and
gives the same first-order margins as the same model held in memory; every mistake is one line, exit 2."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from torch import nn

from marginlab.base.errors import ConfigError
from marginlab.cli import main
from marginlab.data import load_points as load_eval_data
from marginlab.estimators import estimate_margins
from marginlab.experiments import run_experiment
from marginlab.experiments.deep import ModelConfig
from marginlab.nets import loading, preprocess, spec, usercode
from marginlab.nets.loading import load_model
from marginlab.nets.models import build_model, check_options, load_weights
from marginlab.nets.preprocess import Normalize, parse_preprocess

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
N = 30
NET_PY = '''
import torch
from torch import nn


class SmallCNN(nn.Module):
    """A CNN that normalises its own input: (x - mean) / std, then conv, ReLU, linear."""

    def __init__(self, num_classes: int = 10, width: int = 6, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.mean, self.std = mean, std
        self.features = nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(width * 36, num_classes)

    def forward(self, x):
        return self.fc(self.features((x - self.mean) / self.std))


def make_net(width: int = 6, scale: float = 1.0) -> nn.Module:
    """A factory without num_classes: the data's ten digits are assumed."""
    return SmallCNN(width=width, std=scale)
'''


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("code") / "net.py"
    path.write_text(NET_PY)
    return path


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("test_model_io_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    d, _ = load_eval_data("digits", "test", n=N, seed=0)
    return d


def _first_order(model: nn.Module, data) -> np.ndarray:
    return estimate_margins(model.eval(), data.x, data.y, ["first-order"])["first-order"].values.numpy()


def _cli_margins(tmp_path: Path, *args: str) -> tuple[np.ndarray, dict]:
    out = tmp_path / "m"
    argv = [
        "margins",
        *args,
        "--data",
        "digits",
        "--n",
        str(N),
        "--estimators",
        "first-order",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    with open(out / "margins.csv") as f:
        values = np.array([float(r["first-order[rd]"]) for r in csv.DictReader(f)])
    return values, json.loads((out / "summary.json").read_text())


def _cli_error(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "err"
    argv = [
        "margins",
        *args,
        "--data",
        "digits",
        "--n",
        "5",
        "--estimators",
        "first-order",
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("marginlab: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    return err


def test_python_file_with_options(net_file, data, tmp_path):
    torch.manual_seed(0)
    ref = _import(net_file).SmallCNN(width=4, mean=0.3, std=0.2)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    got, summary = _cli_margins(
        tmp_path, "--model", f"{net_file}:SmallCNN", "--weights", str(tmp_path / "w.pt"),
        "--option", "width=4", "--option", "mean=0.3", "--option", "std=0.2",
    )  # fmt: skip
    np.testing.assert_array_equal(got, _first_order(ref, data))
    rec = summary["loaded_model"]
    assert rec["kind"] == "python" and rec["options"] == {"width": 4, "mean": 0.3, "std": 0.2}
    assert rec["weights"] == str(tmp_path / "w.pt") and len(rec["weights_sha256"]) == 64
    assert rec["model_sha256"] == hashlib.sha256(net_file.read_bytes()).hexdigest()
    assert rec["parameters"] == sum(p.numel() for p in ref.parameters())
    assert rec["mapping"] is None and rec["preprocess"] is None


def test_preprocess_folds_normalisation_into_the_model(net_file, data, tmp_path):
    """A model trained on normalised inputs, given ``--preprocess``, equals the model that normalises itself;
    the normalisation is a first ``Normalize`` layer with [1, C, 1, 1] buffers."""
    torch.manual_seed(1)
    ref = _import(net_file).SmallCNN(width=4, mean=0.1307, std=0.3081)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    got, summary = _cli_margins(
        tmp_path, "--model", f"{net_file}:SmallCNN", "--option", "width=4",
        "--weights", str(tmp_path / "w.pt"), "--preprocess", "mean=0.1307,std=0.3081",
    )  # fmt: skip
    np.testing.assert_allclose(got, _first_order(ref, data), rtol=1e-6)
    assert summary["loaded_model"]["preprocess"] == {"mean": [0.1307], "std": [0.3081]}
    loaded = load_model(
        f"{net_file}:SmallCNN", tmp_path / "w.pt", num_classes=10, input_shape=(1, 8, 8),
        options={"width": 4}, preprocess=parse_preprocess("mean=0.1307,std=0.3081"),
    )  # fmt: skip
    first = next(iter(loaded.model.children()))
    assert isinstance(first, Normalize) and first.mean.shape == first.std.shape == (1, 1, 1, 1)
    assert not loaded.model.training


def test_preprocess_per_channel():
    pre = parse_preprocess("mean=0.49,0.48,0.45,std=0.25,0.24,0.26")
    norm = Normalize(pre["mean"], pre["std"])
    x = torch.rand(2, 3, 4, 4)
    want = (x - torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)) / torch.tensor([0.25, 0.24, 0.26]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(norm(x), want)
    for bad in ("mean=a", "avg=0.1", "std=0", "0.5", "mean=0.1,mean=0.2", "std=nan"):
        with pytest.raises(ConfigError, match="--preprocess"):
            parse_preprocess(bad)
    with pytest.raises(ConfigError, match="3 values; the data have 1 channels"):
        load_model("lr", None, num_classes=10, input_shape=(1, 8, 8), preprocess=pre)


def test_factory_in_a_module_without_num_classes(net_file, data, tmp_path, monkeypatch):
    """``package.module:factory``: the factory takes only its own options; ``--option scale=1`` is an int
    where a float is annotated (TOML writes 1 for 1.0), which fits."""
    monkeypatch.syspath_prepend(str(net_file.parent))
    monkeypatch.delitem(sys.modules, "net", raising=False)
    torch.manual_seed(2)
    ref = _import(net_file).make_net(width=3)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    got, summary = _cli_margins(
        tmp_path, "--model", "net:make_net", "--option", "width=3", "--option", "scale=1",
        "--weights", str(tmp_path / "w.pt"),
    )  # fmt: skip
    np.testing.assert_array_equal(got, _first_order(ref, data))
    assert summary["loaded_model"]["spec"] == "net:make_net"


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive(net_file, data, tmp_path, how):
    torch.manual_seed(3)
    ref = _import(net_file).SmallCNN(width=4, mean=0.5, std=0.5).eval()
    saved = torch.jit.script(ref) if how == "script" else torch.jit.trace(ref, data.x[:2])
    saved.save(str(tmp_path / "model.bin"))  # recognised by its content, not its suffix
    got, summary = _cli_margins(tmp_path, "--model", str(tmp_path / "model.bin"))
    np.testing.assert_allclose(got, _first_order(ref, data), rtol=1e-6)
    rec = summary["loaded_model"]
    assert rec["kind"] == "torchscript" and rec["weights"] is None
    assert rec["model_sha256"] == hashlib.sha256((tmp_path / "model.bin").read_bytes()).hexdigest()


def test_onnx_file(net_file, data, tmp_path):
    pytest.importorskip("onnx2torch", exc_type=ImportError)  # needs torchvision: not beside the CPU torch
    pytest.importorskip("onnxscript")  # torch.onnx.export's exporter
    torch.manual_seed(4)
    ref = _import(net_file).SmallCNN(width=4, mean=0.5, std=0.5).eval()
    batch = {"x": {0: torch.export.Dim.DYNAMIC}}
    torch.onnx.export(
        ref, (data.x[:2],), str(tmp_path / "model.onnx"), dynamic_shapes=batch, external_data=False
    )
    got, summary = _cli_margins(tmp_path, "--model", str(tmp_path / "model.onnx"))
    np.testing.assert_allclose(got, _first_order(ref, data), rtol=1e-5)
    assert summary["loaded_model"]["kind"] == "onnx"


def test_onnx_without_the_extra_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # as here: the import fails
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    err = _cli_error(tmp_path, capsys, "--model", str(tmp_path / "model.onnx"))
    assert "marginlab[onnx]" in err and "torchvision" in err


def _mlp(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", widths=(width,), num_classes=10, input_shape=(1, 8, 8)).eval()


def _foreign(model: nn.Module) -> dict[str, torch.Tensor]:
    """The MLP's tensors under another code base's names (fc1, fc2), in the same order."""
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    return dict(zip(names, model.state_dict().values(), strict=True))


MLP = ["--model", "mlp", "--option", "widths=[16]"]


def test_nested_checkpoint_with_foreign_names(data, tmp_path, caplog):
    ref = _mlp(5)
    ckpt = {"epoch": 90, "best_acc": np.float64(0.97), "checkpoint": {"state_dict": _foreign(ref)}}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    with caplog.at_level(logging.INFO, logger="marginlab.nets.weights"):
        got, summary = _cli_margins(tmp_path, *MLP, "--weights", str(tmp_path / "ckpt.pth"))
    np.testing.assert_array_equal(got, _first_order(ref, data))
    rec = summary["loaded_model"]
    assert rec["found_under"] == "checkpoint/state_dict"
    assert rec["mapping"] == {"fc1.weight": "phi.1.weight", "fc1.bias": "phi.1.bias",
                              "fc2.weight": "head.weight", "fc2.bias": "head.bias"}  # fmt: skip
    assert "fc2.weight -> head.weight" in caplog.text


def test_data_parallel_prefix(data, tmp_path):
    ref = _mlp(6)
    torch.save({"model_state_dict": nn.DataParallel(ref).state_dict()}, tmp_path / "dp.pt")
    got, summary = _cli_margins(tmp_path, *MLP, "--weights", str(tmp_path / "dp.pt"))
    np.testing.assert_array_equal(got, _first_order(ref, data))
    assert (
        summary["loaded_model"]["stripped_prefix"] == "module." and summary["loaded_model"]["mapping"] is None
    )


def test_key_map_renames_when_the_order_differs(data, tmp_path, capsys):
    """Head first: pairing in order fails (naming the first mismatch); ``--key-map`` prefix renames fix it."""
    ref = _mlp(7)
    foreign = _foreign(ref)
    torch.save(
        {k: foreign[k] for k in ["fc2.weight", "fc2.bias", "fc1.weight", "fc1.bias"]}, tmp_path / "w.pt"
    )
    err = _cli_error(tmp_path, capsys, *MLP, "--weights", str(tmp_path / "w.pt"))
    assert "checkpoint key 'fc2.weight' [10, 16] does not match model key 'phi.1.weight' [16, 64]" in err
    for key_map, mapping in [
        ("fc1.=phi.1.,fc2.=head.", None),
        ("fc2.=head.", {"fc1.weight": "phi.1.weight", "fc1.bias": "phi.1.bias"}),
    ]:
        # renaming the head is enough: the keys still without a model name pair up in order
        got, summary = _cli_margins(tmp_path, *MLP, "--weights", str(tmp_path / "w.pt"), "--key-map", key_map)
        np.testing.assert_array_equal(got, _first_order(ref, data))
        rec = summary["loaded_model"]
        assert rec["key_map"] == dict(item.split("=") for item in key_map.split(","))
        assert rec["mapping"] == mapping


def test_python_api_returns_the_mapping(tmp_path):
    ref = _mlp(8)
    torch.save({"net": _foreign(ref)}, tmp_path / "w.pt")
    model = _mlp(9)
    info = load_weights(model, tmp_path / "w.pt")
    assert info.found_under == "net" and info.mapping["fc1.bias"] == "phi.1.bias"
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


BAD = {
    "shapes differ": (
        ["--weights", "{wide}"],
        "checkpoint key 'fc1.weight' [20, 64] does not match model key 'phi.1.weight' [16, 64]",
    ),
    "fewer tensors": (
        ["--weights", "{short}"],
        "2 checkpoint tensors to pair in order with 4 model tensors (first unpaired: model key "
        "'head.weight')",
    ),
    "pickled module": (["--weights", "{full}"], "pickled Python objects (marginlab.nets.models.MarginNet)"),
    "two state dicts": (["--weights", "{two}"], "several state_dicts (a, b)"),
    "unused key map": (["--weights", "{wide}", "--key-map", "nope.=phi."], "prefix 'nope.' matches no"),
    "string option": (["--option", 'widths="abc"', "--weights", "{wide}"], "'widths' must be a list of int"),
    "bool option": (["--option", "activation=true", "--weights", "{wide}"], "'activation' must be str"),
    "no weights": ([], "needs its weights"),
    "bad key map": (["--weights", "{wide}", "--key-map", "fc1"], "OLD=NEW"),
}
SPEC_BAD = {
    "unknown": (["--model", "nope"], "unknown model 'nope'"),
    "missing file": (["--model", "{tmp}/gone.py:Net"], "not found"),
    "no class named": (["--model", "{net}"], "name the class or factory"),
    "no such class": (["--model", "{net}:Resnet"], "has no 'Resnet'; nn.Module classes there: SmallCNN"),
    "unknown option": (["--model", "{net}:SmallCNN", "--option", "depth=3"], "has no option 'depth'"),
    "wrong type": (["--model", "{net}:SmallCNN", "--option", "width=2.5"], "'width' must be int, got 2.5"),
    "state dict as model": (["--model", "{wide}"], "holds weights (a torch.save file), not a model"),
    "not a model file": (["--model", "{junk}"], "neither a TorchScript archive nor an ONNX file"),
    "reserved option": (
        ["--model", "{net}:SmallCNN", "--option", "num_classes=3"],
        "has no option 'num_classes'",
    ),
}


@pytest.mark.parametrize("case", [*BAD, *SPEC_BAD])
def test_mistakes_are_one_line(case, net_file, tmp_path, capsys):
    wide = _foreign(_mlp(0, width=20))
    paths = {"wide": tmp_path / "wide.pt", "short": tmp_path / "short.pt", "full": tmp_path / "full.pt",
             "two": tmp_path / "two.pt", "junk": tmp_path / "junk.bin"}  # fmt: skip
    torch.save(wide, paths["wide"])
    torch.save(dict(list(_foreign(_mlp(0)).items())[:2]), paths["short"])
    torch.save(_mlp(0), paths["full"])
    torch.save({"a": wide, "b": wide}, paths["two"])
    paths["junk"].write_bytes(b"not a model")
    args, words = {**BAD, **SPEC_BAD}[case]
    args = [a.format(tmp=tmp_path, net=net_file, **paths) for a in args]
    err = _cli_error(tmp_path, capsys, *(MLP if case in BAD else []), *args)
    assert words in err, err


def test_module_outputs_must_be_logits_of_the_data(tmp_path, capsys):
    (tmp_path / "three.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
    )
    err = _cli_error(tmp_path, capsys, "--model", f"{tmp_path / 'three.py'}:make")
    assert "gives [2, 3] for 2 inputs; the data need logits [N, 10]" in err
    (tmp_path / "broken.py").write_text("import nothing_of_that_name\n")
    err = _cli_error(tmp_path, capsys, "--model", f"{tmp_path / 'broken.py'}:make")
    assert "cannot import" in err and "ModuleNotFoundError" in err


def test_robustness_records_what_was_loaded(data, tmp_path):
    ref = _mlp(10)
    torch.save({"state_dict": _foreign(ref)}, tmp_path / "w.pt")
    argv = ["robustness", *MLP, "--weights", str(tmp_path / "w.pt"), "--data", "digits", "--n", "10",
            "--eps", "0.5", "--attacks", "pgd", "--steps", "2", "--bound", "none",
            "--preprocess", "mean=0,std=1", "--out", str(tmp_path / "rob")]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    rec = res["loaded_model"]
    assert (
        rec["spec"] == "mlp"
        and rec["found_under"] == "state_dict"
        and rec["mapping"]["fc2.bias"] == "head.bias"
    )
    assert rec["preprocess"] == {"mean": [0.0], "std": [1.0]}


def test_train_config_takes_a_python_spec(net_file, tmp_path):
    ModelConfig(name=f"{net_file}:SmallCNN", options={"width": 2})
    with pytest.raises(ConfigError, match="'width' must be int"):
        ModelConfig(name=f"{net_file}:SmallCNN", options={"width": "2"})
    torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ConfigError, match="training needs a registry name"):
        ModelConfig(name=str(tmp_path / "ts.pt"))
    config = {
        "kind": "train", "seed": 0, "data": {"dataset": "digits", "n_train": 100},
        "model": {"name": f"{net_file}:SmallCNN", "options": {"width": 4, "mean": 0.5}},
        "train": {"epochs": 1, "batch_size": 50, "lr": 0.05, "device": "cpu", "progress": False,
                  "threads": 1},
        "tracking": {"estimators": ["first-order"], "n_train": 20, "n_test": 20},
    }  # fmt: skip
    run = run_experiment(config, tmp_path / "run")
    state = torch.load(run / "model.pt", weights_only=True)
    assert set(state) == {"features.0.weight", "features.0.bias", "fc.weight", "fc.bias"}
    assert state["features.0.weight"].shape == (4, 1, 3, 3)


def _factory(
    a: int = 1,
    b: float = 0.5,
    c: tuple[int, int] = (1, 2),
    d: Literal["x", "y"] = "x",
    e: int | None = None,
    f: Sequence[float] = (),
    g: dict[str, int] | None = None,
    h=None,
) -> nn.Module:
    return nn.Identity()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"a": 2, "b": 1, "c": [3, 4], "d": "y", "e": None, "f": [1, 2.5], "g": {"k": 1}, "h": "any"}, None),
        ({"a": True}, "'a' must be int, got True"),
        ({"a": 1.0}, "'a' must be int"),
        ({"b": "0.5"}, "'b' must be float"),
        ({"c": [1, 2, 3]}, "'c' must be a list of int"),
        ({"d": "z"}, "'d' must be one of 'x', 'y'"),
        ({"e": "3"}, "'e' must be int or none"),
        ({"f": "abc"}, "'f' must be a list of float"),
        ({"g": {"k": "v"}}, "'g' must be"),
        ({"z": 1}, "has no option 'z'"),
    ],
)
def test_options_are_checked_against_annotations(options, match):
    if match is None:
        check_options(_factory, options, "model 'f'")
    else:
        with pytest.raises(ConfigError, match=match):
            check_options(_factory, options, "model 'f'")


def test_the_old_model_io_module_still_imports(monkeypatch):
    """``marginlab.model_io`` (0.1) imports as :mod:`marginlab.nets.loading`, with a DeprecationWarning; each
    of its public names resolves to the object that now holds it (names loading does not use: warned)."""
    monkeypatch.delitem(sys.modules, "marginlab.model_io", raising=False)
    warning = "marginlab.model_io is deprecated; use marginlab.nets.loading"
    with pytest.warns(DeprecationWarning, match=warning):
        old = importlib.import_module("marginlab.model_io")
    here = {"LoadedModel": loading, "load_model": loading, "load_saved": loading, "check_forward": loading,
            "ONNX_HINT": loading, "ModelSpec": spec, "resolve_spec": spec, "build_from_spec": usercode,
            "Normalize": preprocess}  # fmt: skip
    for name, module in here.items():
        assert getattr(old, name) is getattr(module, name), name
    moved = {"KINDS": spec, "model_factory": usercode, "check_spec": usercode, "parse_preprocess": preprocess}
    for name, module in moved.items():
        with pytest.warns(DeprecationWarning, match=f"use {module.__name__}.{name}"):
            assert getattr(old, name) is getattr(module, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        old.nope  # noqa: B018
