"""Bad inputs found by a fuzzer (issue 21): each one gives one line and exit 2, or a documented clamp.

Non-finite logits (from weights or a float32-underflowing ``--preprocess``), out-of-range ``--threads``,
``--indices`` and ``--out``, pickles nested a hundred thousand levels deep, a ``--data-dir`` that is no
directory, empty option values, AutoAttack radii that would never run, state dicts of the wrong number
kind, raw pickles and ``--key-map`` renames that name no model key; and ``-q``/``-v`` after the
sub-command. Tiny models on scikit-learn's 8x8 digits, run in-process."""

from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import cli_error
from marginlab.base.errors import ConfigError
from marginlab.cli import main
from marginlab.commands import args as cli_args
from marginlab.data import load_dataset
from marginlab.estimators import estimate_margins
from marginlab.nets.models import build_model
from marginlab.nets.preprocess import parse_preprocess

MLP = ["--model", "mlp", "--option", "widths=[8]"]
DEEP = 100_000  # levels of nesting: far past Python's recursion limit (1000)
# a protocol-2 pickle of [] wrapped in DEEP one-element tuples (the unpickler builds it without recursion)
DEEP_PICKLE = b"\x80\x02]" + b"\x85" * DEEP + b"."


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=10, input_shape=(1, 8, 8), widths=(8,))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights files of the tiny MLP: good ones, ones whose logits overflow, and ones of the wrong kind."""
    load_dataset("digits", "test")  # import scikit-learn once here, not inside the first test's time
    d = tmp_path_factory.mktemp("weights")
    state = _mlp().state_dict()
    files = {
        "good": state,
        # finite weights (the NaN-weights check passes) whose logits overflow to inf - inf = NaN
        "huge": {k: v * 1e30 if k.endswith("weight") else v for k, v in state.items()},
        "complex": {k: v.to(torch.complex64) for k, v in state.items()},
        "int": {k: (v * 10).long() for k, v in state.items()},
        "bool": {k: v > 0 for k, v in state.items()},
    }
    for name, sd in files.items():
        torch.save(sd, d / f"{name}.pt")
    return {name: d / f"{name}.pt" for name in files}


def _margins(w: Path, out: Path, *extra: str) -> list[str]:
    return ["margins", *MLP, "--weights", str(w), "--data", "digits", "--n", "20", "--estimators",
            "first-order", "--out", str(out), *extra]  # fmt: skip


# -- 2. no NaN passes as a result ------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["margins", "robustness", "bracket"])
def test_non_finite_logits_are_refused(command, weights, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _margins(weights["huge"], out)
    if command == "robustness":
        argv = ["robustness", *MLP, "--weights", str(weights["huge"]), "--data", "digits", "--n", "20",
                "--eps", "0.5", "--attacks", "pgd", "--steps", "2", "--certify", "off",
                "--out", str(out)]  # fmt: skip
    elif command == "bracket":
        argv[argv.index("first-order")] = "bracket"
    err = cli_error(argv, capsys)
    assert "logits are not finite (NaN or inf) on 20 of 20 points" in err
    assert not out.exists()


class _NanOnOnePoint(nn.Module):
    """A linear model whose logits are NaN on exactly the inputs whose first pixel is 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x.flatten(1))
        return torch.where((x.flatten(1)[:, :1] == 0.5), torch.full_like(z, float("nan")), z)


def test_python_api_checks_every_point_not_a_sample():
    torch.manual_seed(0)
    x = torch.rand(80, 1, 8, 8) * 0.4
    x[70, 0, 0, 0] = 0.5  # past the first 64 points: a sample of them would miss it
    y = torch.arange(80) % 10
    with pytest.raises(ConfigError, match="not finite .* on 1 of 80 points"):
        estimate_margins(_NanOnOnePoint().eval(), x, y, ["first-order"])


@pytest.mark.parametrize(
    "text, needle",
    [("std=1e-300", "std 1e-300 is not a normal float32"), ("std=1e-40", "std 1e-40 is not a normal")],
)
def test_preprocess_outside_float32_is_refused(text, needle, weights, tmp_path, capsys):
    with pytest.raises(ConfigError, match=needle):
        parse_preprocess(text)
    err = cli_error(_margins(weights["good"], tmp_path / "out", "--preprocess", text), capsys)
    assert needle in err and not (tmp_path / "out").exists()
    assert parse_preprocess("mean=0.5,std=1e-3") == {"mean": [0.5], "std": [1e-3]}  # normal ones pass


# -- 5. crashes and tracebacks -------------------------------------------------------------------------
def test_threads_above_the_cores_are_clamped_with_a_warning(monkeypatch, caplog):
    from marginlab.base.seed import available_cores

    asked: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)  # never start 100000 threads for real
    with caplog.at_level(logging.WARNING, logger="marginlab.base.seed"):
        cli_args.set_threads(100_000)
    cores = available_cores()
    assert asked == [cores]
    assert f"--threads 100000 is more than the {cores} CPU cores here; using {cores}" in caplog.text
    cli_args.set_threads(1)
    assert asked == [cores, 1]


@pytest.mark.parametrize(
    "indices, needle",
    [
        ("99999999999999999999999", "out of range (indices must fit in 64 bits)"),
        ("3,-99999999999999999999999", "out of range"),
        ("", "--indices is empty"),  # the CLI's one check for empty values
        (",,", "--indices names no point"),
    ],
)
def test_indices_beyond_64_bits_or_empty(indices, needle, weights, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _margins(weights["good"], out)
    argv[argv.index("--n") : argv.index("--n") + 2] = ["--indices", indices]
    assert needle in cli_error(argv, capsys)
    assert not out.exists()


def test_out_too_long_for_the_filesystem(weights, tmp_path, capsys):
    err = cli_error(_margins(weights["good"], tmp_path / ("a" * 300)), capsys)
    assert "is 300 bytes; the filesystem allows 255 (NAME_MAX)" in err and len(err) < 300
    deep = tmp_path.joinpath(*["b" * 200] * 25)
    err = cli_error(_margins(weights["good"], deep), capsys)
    assert "(PATH_MAX 4096)" in err and len(err) < 300
    assert not any(tmp_path.iterdir())


def test_too_long_input_paths_are_one_line_and_long_index_lists_work(weights, tmp_path, capsys):
    long = str(tmp_path / ("a" * 300))
    for argv in (
        _margins(Path(long), tmp_path / "out"),
        [
            "margins",
            "--model",
            f"{long}.py:Net",
            "--data",
            "digits",
            "--estimators",
            "first-order",
            "--out",
            str(tmp_path / "out"),
        ],  # fmt: skip
        ["data", "check", "digits", "--data-dir", long],
        ["run", f"{long}.toml"],
    ):
        err = cli_error(argv, capsys)
        assert "path too long for the filesystem" in err, err
        assert len(err) < 250
    assert not (tmp_path / "out").exists()
    # 200 indices as one argument: no file of that name can exist, so it is a list (not ENAMETOOLONG)
    argv = _margins(weights["good"], tmp_path / "ok")
    argv[argv.index("--n") : argv.index("--n") + 2] = ["--indices", ",".join(map(str, range(200)))]
    assert main(argv) == 0


def test_deeply_nested_pickle_as_the_mnist_bundle(tmp_path, capsys):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.pkl.gz").write_bytes(gzip.compress(DEEP_PICKLE))
    err = cli_error(["data", "check", "mnist", "--data-dir", str(tmp_path)], capsys)
    assert "mnist.pkl.gz: containers nested over 100 levels deep" in err


def test_deeply_nested_pickle_as_weights(tmp_path, capsys):
    # the legacy torch.save layout: a magic-number pickle first; here the deep object stands in for it
    path = tmp_path / "deep.pt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + DEEP_PICKLE)
    err = cli_error(_margins(path, tmp_path / "out"), capsys)
    assert f"cannot read weights file {path}: its contents are nested too deeply" in err


# -- 6. inputs silently ignored or accepted ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "missing"])
def test_data_dir_must_be_a_directory(kind, weights, tmp_path, capsys):
    data_dir = tmp_path / "data"
    if kind == "file":
        data_dir.write_text("not a directory")
    err = cli_error(_margins(weights["good"], tmp_path / "out", "--data-dir", str(data_dir)), capsys)
    expected = "is a file, not a directory" if kind == "file" else "does not exist"
    assert f"data directory {data_dir} {expected}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--data-dir", "--preprocess", "--key-map"])
def test_empty_values_are_refused_not_taken_as_the_default(option, weights, tmp_path, capsys):
    err = cli_error(_margins(weights["good"], tmp_path / "out", option, ""), capsys)
    assert f"{option} is empty; give a value or leave the option out" in err
    assert not (tmp_path / "out").exists()
    if option == "--data-dir":
        assert "--data-dir is empty" in cli_error(["data", "check", "digits", "--data-dir", " "], capsys)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            ["--eps", "0.5", "--aa-eps", "0.7"],
            "AutoAttack radius (aa_eps) 0.7 is not among the radii evaluated",
        ),
        (
            ["--eps", "0.5", "--aa-eps", "0.5", "--attacks", "pgd"],
            "autoattack is not among the attacks (pgd)",
        ),
    ],
)
def test_aa_eps_that_would_never_run(extra, needle, weights, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["robustness", *MLP, "--weights", str(weights["good"]), "--data", "digits", "--n", "5",
            "--certify", "off", *extra, "--out", str(out)]  # fmt: skip
    assert needle in cli_error(argv, capsys)
    assert not out.exists()


@pytest.mark.parametrize("kind, dtype", [("complex", "complex64"), ("int", "int64"), ("bool", "bool")])
def test_state_dict_of_the_wrong_number_kind(kind, dtype, weights, tmp_path, capsys):
    err = cli_error(_margins(weights[kind], tmp_path / "out"), capsys)
    assert f"tensor 'phi.1.weight' is {dtype}, the model's is float32" in err


def test_raw_pickle_as_weights_is_one_line_without_torch_advice(tmp_path, capsys):
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    err = cli_error(_margins(path, tmp_path / "out"), capsys)
    assert f"cannot read weights file {path}: not a torch.save file of tensors" in err
    assert "weights_only" not in err and "PyTorch 2.6" not in err


def test_key_map_renames_must_name_model_keys(weights, tmp_path, capsys):
    # phi.1.* -> foo.1.*: once the rename names no model key it must not be paired in order silently
    err = cli_error(_margins(weights["good"], tmp_path / "out", "--key-map", "phi.=foo."), capsys)
    assert "--key-map renames a checkpoint key" in err and "to 'foo.1.weight', which is not a key" in err


# -- 8. -q / -v after the sub-command ------------------------------------------------------------------
def test_quiet_and_verbose_after_the_sub_command(weights, tmp_path, capsys):
    logger = logging.getLogger("marginlab")
    before = logger.level
    try:
        assert main(_margins(weights["good"], tmp_path / "q", "-q")) == 0
        assert logger.getEffectiveLevel() == logging.WARNING
    finally:
        logger.setLevel(before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # a usage error: argparse's one line and exit 2
        main(["-q", *_margins(weights["good"], tmp_path / "v", "--verbose")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "marginlab: error: argument -q/--quiet: not allowed with argument -v/--verbose (see --help)"
    assert not (tmp_path / "v").exists()


# -- file formats (deliverable 3): one line naming the file --------------------------------------------
def test_nan_weights_name_the_weights_file(tmp_path, capsys):
    path = tmp_path / "nan.pt"
    torch.save({k: torch.full_like(v, float("nan")) for k, v in _mlp().state_dict().items()}, path)
    err = cli_error(_margins(path, tmp_path / "out"), capsys)
    assert f"weights file {path} holds NaN or infinite weights (first: 'phi.1.weight')" in err


def test_deeply_nested_toml_config_and_override(tmp_path, capsys):
    config = tmp_path / "deep.toml"
    config.write_text("a = " + "[" * DEEP + "]" * DEEP)
    err = cli_error(["run", str(config), "--out", str(tmp_path / "run")], capsys)
    assert f"config file {config} nests arrays or tables too deeply" in err
    err = cli_error(_margins(tmp_path / "none.pt", tmp_path / "out", "--option", "w=" + "[" * DEEP), capsys)
    assert "nests arrays or tables too deeply" in err


def test_mnist_bundle_with_a_corrupt_deflate_stream(tmp_path, capsys):
    # a gzip header, then a deflate block of the reserved type 3: zlib.error (not an OSError) on reading
    packed = gzip.compress(b"x")[:10] + b"\xff" * 32
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.pkl.gz").write_bytes(packed)
    err = cli_error(["data", "check", "mnist", "--data-dir", str(tmp_path)], capsys)
    assert "mnist.pkl.gz: corrupt gzip file" in err
