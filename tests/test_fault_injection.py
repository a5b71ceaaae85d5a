"""Fault injection for every file format marginlab reads (issue 21): each file, made real by a tiny run,
is truncated at random offsets, bit-flipped, and replaced by pathological content (deep nesting, huge
declared sizes, complex or integer tensors, NaN), then read through the CLI command that reads it.

The contract: the command either still accepts the file (a mutation can leave a valid file: a flipped bit
in a float, a torn last line of ``metrics.jsonl``) or refuses it with exit 2 and one line
``marginlab: error: ...`` that names the file; never a traceback, another exit status, or a crash.
Where a reference parser (``json``, ``tomllib``, ``torch.load``, ``numpy.load``) already rejects the
mutated bytes, the command must refuse them. The work after the read (training, estimation, attacks) is
replaced by a sentinel, so an accepted file costs nothing. Hypothesis is derandomized; profiles
``faults-default`` (a few mutations per file) and ``faults-slow`` (many, the tests marked ``slow``).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import pickle
import shutil
import tomllib
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import marginlab.commands.margins as margins_cmd
import marginlab.data.idx_source as idx_source
import marginlab.plots.training as plots_training
from conftest import idx_bytes, tiny_train_toml, without_log_lines
from marginlab.cli import main
from marginlab.experiments import EXPERIMENTS
from marginlab.lab.names import CHECKPOINT, CONFIG, MARGINS, METRICS, SUMMARY, WEIGHTS

_COMMON = dict(
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each failure is one mutation already
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    report_multiple_bugs=False,
    database=None,
)
settings.register_profile("faults-default", max_examples=3, **_COMMON)
settings.register_profile("faults-slow", max_examples=60, **_COMMON)
DEFAULT, SLOW = settings.get_profile("faults-default"), settings.get_profile("faults-slow")


@pytest.fixture(params=[DEFAULT, pytest.param(SLOW, marks=pytest.mark.slow)], ids=["default", "slow"])
def profile(request: pytest.FixtureRequest) -> settings:
    """The hypothesis settings of a test: a few mutations by default, many under ``-m slow``."""
    return request.param


class WorkStarted(Exception):
    """Raised in place of the work that follows the read: the command accepted the file."""


# -- real files, made once -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Originals:
    """The real files every mutation starts from."""

    root: Path
    run: Path  # a finished tiny train run
    config: Path  # its TOML config
    scripted: Path  # the run's model as TorchScript


@pytest.fixture(scope="session")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Originals:
    root = tmp_path_factory.mktemp("faults")
    config = root / "tiny.toml"
    config.write_text(tiny_train_toml(epochs=1, n_train=100))
    with pytest.MonkeyPatch.context() as m:  # no figures: nothing here reads them
        m.setattr(EXPERIMENTS["train"], "plot", lambda run_dir: [])
        assert main(["-q", "run", str(config), "--out", str(root / "run")]) == 0
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    scripted = root / "scripted.pt"
    torch.jit.script(model).save(str(scripted))
    return Originals(root, root / "run", config, scripted)


# -- mutations -------------------------------------------------------------------------------------------
def truncations(data: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, max(len(data) - 1, 0)).map(lambda k: data[:k])


def bit_flips(data: bytes) -> st.SearchStrategy[bytes]:
    def flip(pos: int, bit: int) -> bytes:
        b = bytearray(data)
        b[pos] ^= 1 << bit
        return bytes(b)

    return st.builds(flip, st.integers(0, len(data) - 1), st.integers(0, 7))


def mutations(data: bytes, pathological: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(truncations(data), bit_flips(data), st.sampled_from(pathological))


DEEP = 200_000  # nesting far beyond any recursion limit
JSON_PATHOLOGICAL = [
    b"[" * DEEP + b"]" * DEEP,
    b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    b"1e999",
    b"NaN",
    b"null",
    b'"text"',
    b"[]",
    b"\xff\xfe\x00garbage",
    b"",
    b'{"kind": "train", "margins": {"first-order": {"train": {"first": 1}}}}',
]


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _deep_pickle(depth: int = DEEP // 10) -> bytes:
    """A pickle of lists nested ``depth`` levels (built by opcodes: Python could not pickle it)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def weights_pathological(state: dict[str, torch.Tensor]) -> list[bytes]:
    first = next(iter(state))
    return [
        _torch_bytes({k: v.to(torch.complex64) for k, v in state.items()}),
        _torch_bytes({k: v.to(torch.int64) for k, v in state.items()}),
        _torch_bytes({k: torch.full_like(v, float("nan")) for k, v in state.items()}),
        _torch_bytes({**state, first: torch.zeros(10**4, 3)}),
        _torch_bytes({k: v.to(torch.bool) for k, v in state.items()}),
        _torch_bytes([1, 2, 3]),
        _torch_bytes({"model": {"module": {"state_dict": 7}}}),
        _deep_pickle(),
        pickle.dumps({"x": 1}),
        b"",
    ]


def refuses(parse: Callable[[bytes], Any]) -> Callable[[bytes], bool]:
    """``bytes -> whether the reference parser rejects them``."""

    def rejected(data: bytes) -> bool:
        try:
            parse(data)
        except Exception:  # any failure of the reference parser: the command must refuse too
            return True
        return False

    return rejected


def _json(data: bytes) -> Any:
    return json.loads(data.decode())


def _jsonl_but_last(data: bytes) -> Any:
    lines = data.decode().splitlines()
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def _torch(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _npz(data: bytes) -> Any:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# -- the contract ----------------------------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training, estimation and figure drawing stop with :class:`WorkStarted`; every read happens."""

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise WorkStarted

    for experiment in EXPERIMENTS.values():
        monkeypatch.setattr(experiment, "plot", stop)
    monkeypatch.setattr(margins_cmd, "estimate_margins", stop)


def check(argv: list[str], name: str, must_refuse: bool, capsys: Any, *, named: bool = True) -> None:
    """Accepted (exit 0 or the work started), unless ``must_refuse``; else exit 2 and one line naming
    the file ``name`` (when ``named``)."""
    capsys.readouterr()
    try:
        code = main(["-q", *argv])
    except WorkStarted:
        code = 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    if code == 0 and not must_refuse:
        return
    lines = without_log_lines(err)
    assert code == 2, (argv, code, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("marginlab: error: "), (argv, err[-3000:])
    assert not named or name in lines[0], (name, lines[0])


_counter = iter(range(10**9))


def fresh_copy(src: Path, root: Path) -> Path:
    """A copy of the run directory ``src`` under a new name (readers cache by path, size and time)."""
    dst = root / f"copy-{next(_counter)}"
    shutil.copytree(src, dst)
    return dst


# -- the files and the commands that read them -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """One file marginlab reads: its original bytes, how a mutated copy is put in place and read
    (``install(bad, tmp, originals) -> (argv, the file's name)``), the reference parser, and pathological
    contents by name."""

    original: Callable[[Originals, Path], bytes]
    install: Callable[[bytes, Path, Originals], tuple[list[str], str]]
    parse: Callable[[bytes], Any] | None  # None: every mutation must be refused (e.g. checksummed data)
    pathological: dict[str, Callable[[Originals], bytes]]
    work: str = "none"  # what the no-work sentinel replaces: "none", "plot" (after a run), "train"
    strict_length: bool = False  # only a mutation that changes the length must be refused
    # every pathological content is invalid even where the reference parser reads it (a state dict of
    # complex tensors, a checkpoint without a training state)
    always_invalid: bool = False
    # a file the reference parser reads but the command refuses is named too (a config's semantic error,
    # "unknown key ...", names the key rather than the file)
    names_valid: bool = True


def _in_run(name: str) -> Callable[[bytes, Path, Originals], tuple[list[str], str]]:
    """A run-directory file of a fresh copy of the run, read by ``report``."""

    def install(bad: bytes, tmp: Path, o: Originals) -> tuple[list[str], str]:
        run_dir = fresh_copy(o.run, tmp)
        (run_dir / name).write_bytes(bad)
        return ["report", str(run_dir), "--out", str(tmp / f"report-{next(_counter)}")], name

    return install


def _npz_install(bad: bytes, tmp: Path, o: Originals) -> tuple[list[str], str]:
    run_dir = fresh_copy(o.run, tmp)
    npz = sorted((run_dir / MARGINS).glob("*.npz"))[-1]
    npz.write_bytes(bad)
    return ["plot", str(run_dir)], npz.name


def _checkpoint_install(bad: bytes, tmp: Path, o: Originals) -> tuple[list[str], str]:
    run_dir = fresh_copy(o.run, tmp)
    (run_dir / SUMMARY).unlink()  # unfinished: --resume reads the checkpoint
    (run_dir / CHECKPOINT).write_bytes(bad)
    return ["run", "--resume", str(run_dir)], CHECKPOINT


MARGINS_ARGS = ["--data", "digits", "--n", "5", "--estimators", "first-order"]


def _weights_install(bad: bytes, tmp: Path, o: Originals) -> tuple[list[str], str]:
    path = tmp / f"w-{next(_counter)}.pt"
    path.write_bytes(bad)
    argv = ["margins", "--model", "mlp", "--option", "widths=[16]", "--weights", str(path), *MARGINS_ARGS]
    return [*argv, "--out", str(tmp / f"m-{next(_counter)}")], path.name


def _script_install(bad: bytes, tmp: Path, o: Originals) -> tuple[list[str], str]:
    path = tmp / f"s-{next(_counter)}.pt"
    path.write_bytes(bad)
    return [
        "margins",
        "--model",
        str(path),
        *MARGINS_ARGS,
        "--out",
        str(tmp / f"m-{next(_counter)}"),
    ], path.name


def _toml_install(bad: bytes, tmp: Path, o: Originals) -> tuple[list[str], str]:
    path = tmp / f"c-{next(_counter)}.toml"
    path.write_bytes(bad)
    return ["run", str(path), "--out", str(tmp / f"run-{next(_counter)}")], path.name


IDX_NAMES = {
    "train-images-idx3-ubyte": (2051, (12, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (12,)),
    "t10k-images-idx3-ubyte": (2051, (6, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (6,)),
}


def _idx_files(root: Path) -> Path:
    rng = np.random.default_rng(0)
    d = root / "mnist"
    d.mkdir(parents=True)
    for name, (magic, shape) in IDX_NAMES.items():
        (d / name).write_bytes(idx_bytes(rng.integers(0, 10, shape), magic))
    return d


def _idx_install(name: str) -> Callable[[bytes, Path, Originals], tuple[list[str], str]]:
    def install(bad: bytes, tmp: Path, o: Originals) -> tuple[list[str], str]:
        root = tmp / f"d-{next(_counter)}"
        (_idx_files(root) / name).write_bytes(bad)
        return ["data", "check", "mnist", "--data-dir", str(root)], name

    return install


def _idx_original(name: str) -> Callable[[Originals, Path], bytes]:
    return lambda o, tmp: (_idx_files(tmp / f"orig-{next(_counter)}") / name).read_bytes()


def _idx_header(magic: int, dims: tuple[int, ...]) -> bytes:
    return b"".join(int(v).to_bytes(4, "big") for v in (magic, *dims))


IDX_PATHOLOGICAL: dict[str, Callable[[Originals], bytes]] = {
    "exabytes-declared": lambda o: _idx_header(2051, (2**32 - 1, 2**16, 2**16)) + b"\x00" * 64,
    "zero-images": lambda o: _idx_header(2051, (0, 28, 28)),
    "float-data": lambda o: _idx_header(0x0D03, (1, 28, 28)) + b"\x00" * 784,
    "255-dims": lambda o: _idx_header(0x08FF, (1,)) + b"\x00",
    "gz-huge-declared": lambda o: gzip.compress(_idx_header(2051, (2**31, 28, 28))),
    "gz-trailing-garbage": lambda o: gzip.compress(b"\x00" * 16) + b"trailing",
    "empty": lambda o: b"",
}


def _bundle(n: int = 4) -> bytes:
    rng = np.random.default_rng(0)
    parts = tuple(
        (rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n)) for _ in range(3)
    )
    return gzip.compress(pickle.dumps(parts, protocol=2), mtime=0)


def _bundle_install(bad: bytes, tmp: Path, o: Originals) -> tuple[list[str], str]:
    root = tmp / f"p-{next(_counter)}"
    root.mkdir()
    (root / "mnist.pkl.gz").write_bytes(bad)
    return ["data", "check", "mnist", "--data-dir", str(root)], "mnist.pkl.gz"


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def _first_flip(data: bytes, fails: Callable[[bytes], bool], *, from_end: bool = False) -> bytes:
    """The first single-bit flip of ``data`` (scanning from the start, or the end) for which ``fails``;
    found deterministically, so a pathological case that random flips hit only rarely is always there."""
    positions = range(len(data) - 1, -1, -1) if from_end else range(len(data))
    for pos in positions:
        for bit in range(8):
            bad = _flip(data, pos, bit)
            if fails(bad):
                return bad
    raise AssertionError("no such flip")


def _raises(parse: Callable[[bytes], Any], exc: type[BaseException]) -> Callable[[bytes], bool]:
    def fails(data: bytes) -> bool:
        try:
            parse(data)
        except exc:
            return True
        except Exception:
            return False
        return False

    return fails


def _zip_names(data: bytes) -> Any:
    """The member names of a zip archive that still looks like one (its end record is intact)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.namelist()


def _pairs(x: np.ndarray, y: np.ndarray) -> bytes:
    return gzip.compress(pickle.dumps(((x, y),) * 3, protocol=2))


PICKLE_PATHOLOGICAL: dict[str, Callable[[Originals], bytes]] = {
    "deep-nesting": lambda o: gzip.compress(_deep_pickle()),
    "complex-images": lambda o: _pairs(np.zeros((2, 784), np.complex64), np.zeros(2, np.int64)),
    "float-labels": lambda o: _pairs(np.zeros((2, 784), np.float32), np.zeros(2, np.float32)),
    "nan-images": lambda o: _pairs(np.full((2, 784), np.nan, np.float32), np.zeros(2, np.int64)),
    "a-list": lambda o: gzip.compress(pickle.dumps([1, 2, 3])),
    "code": lambda o: gzip.compress(b"cos\nsystem\n(S'true'\ntR."),
    "corrupt-deflate": lambda o: _flip(_bundle(), 322, 4),
    "not-gzip": lambda o: b"not gzip",
    "empty": lambda o: b"",
}
JSON_CASES: dict[str, Callable[[Originals], bytes]] = {
    "deep-array": lambda o: b"[" * DEEP + b"]" * DEEP,
    "deep-object": lambda o: b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "huge-number": lambda o: b"1e999",
    "nan": lambda o: b"NaN",
    "null": lambda o: b"null",
    "string": lambda o: b'"text"',
    "array": lambda o: b"[]",
    "not-utf8": lambda o: b"\xff\xfe\x00garbage",
    "empty": lambda o: b"",
    "odd-shape": lambda o: b'{"kind": "train", "margins": {"first-order": {"train": {"first": 1}}}}',
}


def _state(o: Originals) -> dict[str, torch.Tensor]:
    return torch.load(o.run / WEIGHTS, weights_only=True)


WEIGHTS_CASES: dict[str, Callable[[Originals], bytes]] = {
    "complex": lambda o: _torch_bytes({k: v.to(torch.complex64) for k, v in _state(o).items()}),
    "int64": lambda o: _torch_bytes({k: v.to(torch.int64) for k, v in _state(o).items()}),
    "bool": lambda o: _torch_bytes({k: v.to(torch.bool) for k, v in _state(o).items()}),
    "nan": lambda o: _torch_bytes({k: torch.full_like(v, float("nan")) for k, v in _state(o).items()}),
    "wrong-shape": lambda o: _torch_bytes({k: torch.zeros(10**4, 3) for k in _state(o)}),
    "a-list": lambda o: _torch_bytes([1, 2, 3]),
    "nested-non-tensor": lambda o: _torch_bytes({"model": {"module": {"state_dict": 7}}}),
    "deep-nesting": lambda o: _deep_pickle(),
    "raw-pickle": lambda o: pickle.dumps({"x": 1}),
    "empty": lambda o: b"",
}
CHECKPOINT_CASES: dict[str, Callable[[Originals], bytes]] = {
    "deep-nesting": lambda o: _deep_pickle(),
    "epoch-a-string": lambda o: _torch_bytes({"epoch": "x"}),
    "a-list": lambda o: _torch_bytes([]),
    "weights-only": lambda o: (o.run / WEIGHTS).read_bytes(),
    "empty": lambda o: b"",
}
TOML_CASES: dict[str, Callable[[Originals], bytes]] = {
    "deep-nesting": lambda o: b"a = " + b"[" * DEEP + b"]" * DEEP,
    "not-utf8": lambda o: b"\xff\xfe",
    "duplicate-key": lambda o: b"kind = 'train'\n" * 2,
    "huge-exponent": lambda o: b"x = 1e999999",
    "empty": lambda o: b"",
}


def _toml(data: bytes) -> Any:
    return tomllib.loads(data.decode())


def _torchscript(data: bytes) -> Any:
    return torch.jit.load(io.BytesIO(data))


TARGETS: dict[str, Target] = {
    CONFIG: Target(lambda o, t: (o.run / CONFIG).read_bytes(), _in_run(CONFIG), _json, JSON_CASES),
    SUMMARY: Target(lambda o, t: (o.run / SUMMARY).read_bytes(), _in_run(SUMMARY), _json, JSON_CASES),
    METRICS: Target(
        lambda o, t: (o.run / METRICS).read_bytes(), _in_run(METRICS), _jsonl_but_last, JSON_CASES
    ),
    "margins-npz": Target(
        lambda o, t: sorted((o.run / MARGINS).glob("*.npz"))[-1].read_bytes(),
        _npz_install,
        _npz,
        {
            "complex": lambda o: _npz_bytes(
                {"epoch": np.array(1), "train/first-order": np.array([1 + 2j, 3j])}
            ),
            "empty": lambda o: b"",
            "zip-header-only": lambda o: b"PK\x03\x04" + b"\x00" * 40,
            "corrupt-deflate": lambda o: _first_flip(
                sorted((o.run / MARGINS).glob("*.npz"))[-1].read_bytes(), _raises(_npz, zlib.error)
            ),
        },
        "draw",
    ),
    CHECKPOINT: Target(
        lambda o, t: (o.run / CHECKPOINT).read_bytes(),
        _checkpoint_install,
        _torch,
        CHECKPOINT_CASES,
        "plot",
        always_invalid=True,
    ),
    "weights": Target(
        lambda o, t: (o.run / WEIGHTS).read_bytes(),
        _weights_install,
        _torch,
        WEIGHTS_CASES,
        "plot",
        always_invalid=True,
    ),
    "torchscript": Target(
        lambda o, t: o.scripted.read_bytes(),
        _script_install,
        _torchscript,
        {
            "empty": lambda o: b"",
            "state-dict": lambda o: _torch_bytes({"a": torch.zeros(2)}),
            "bad-central-directory": lambda o: _first_flip(
                o.scripted.read_bytes(), _raises(_zip_names, zipfile.BadZipFile), from_end=True
            ),
        },
        "plot",
        always_invalid=True,
    ),
    "toml": Target(
        lambda o, t: o.config.read_bytes(), _toml_install, _toml, TOML_CASES, "train", names_valid=False
    ),
    **{
        f"idx-{name}": Target(
            _idx_original(name), _idx_install(name), None, IDX_PATHOLOGICAL, strict_length=True
        )
        for name in IDX_NAMES
    },
    "mnist-pickle": Target(lambda o, t: _bundle(), _bundle_install, None, PICKLE_PATHOLOGICAL),
}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# -- bugs known and not yet fixed, xfail(strict=True) so that a fix is noticed (issue 21's are all fixed) --
KNOWN_BUGS: dict[tuple[str, str], str] = {}
# Random mutations that hit a known bug in the slow profile's many examples: target -> reason.
KNOWN_RANDOM_BUGS_SLOW: dict[str, str] = {}
KNOWN_RANDOM_BUGS: dict[str, str] = {}


def _with_known_bugs(target: str, case: str) -> Any:
    reason = KNOWN_BUGS.get((target, case))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(target, case, id=f"{target}-{case}", marks=marks)


def _close(fig: Any, path: Path) -> Path:
    """In place of rendering a figure to ``path``: drop it."""
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


@pytest.fixture
def sentinel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], None]:
    """``sentinel(work)``: replace the work after the read by :class:`WorkStarted`."""

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise WorkStarted

    monkeypatch.chdir(tmp_path)  # anything written to a default place stays in the test's folder

    def install(work: str) -> None:
        if work == "none":
            return
        if work == "draw":  # figures are drawn from the files read, but no PNG is rendered
            monkeypatch.setattr(plots_training, "save", _close)
            return
        for experiment in EXPERIMENTS.values():
            monkeypatch.setattr(experiment, "plot" if work == "plot" else "run", stop)
        monkeypatch.setattr(margins_cmd, "estimate_margins", stop)

    return install


@pytest.fixture
def no_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """These small IDX files are not the official MNIST: the checksum is switched off so that the parser
    itself meets each mutation (else the checksum refuses the first file read, whatever the mutation)."""
    monkeypatch.setattr(idx_source, "OFFICIAL", {})


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(t, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_RANDOM_BUGS[t])])
        if t in KNOWN_RANDOM_BUGS
        else t
        for t in sorted(TARGETS)
    ],
)
def test_truncated_or_bit_flipped(
    request: pytest.FixtureRequest,
    target: str,
    profile: settings,
    originals: Originals,
    tmp_path: Path,
    capsys: Any,
    sentinel: Callable[[str], None],
    no_checksums: None,
) -> None:
    """Random truncations and single bit flips of every file: accepted while the file stays valid,
    else one line naming it."""
    if profile is SLOW and target in KNOWN_RANDOM_BUGS_SLOW:  # the many examples reach a known bug
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_RANDOM_BUGS_SLOW[target]))
    t = TARGETS[target]
    sentinel(t.work)
    data = t.original(originals, tmp_path)

    @profile
    @given(bad=st.one_of(truncations(data), bit_flips(data)))
    def run(bad: bytes) -> None:
        argv, name = t.install(bad, tmp_path, originals)
        unreadable = t.parse is None or refuses(t.parse)(bad)
        must = len(bad) != len(data) if t.strict_length else unreadable
        check(argv, name, must, capsys, named=unreadable or t.names_valid)

    run()


PATHOLOGICAL = [
    _with_known_bugs(target, case) for target in sorted(TARGETS) for case in TARGETS[target].pathological
]


@pytest.mark.parametrize("target, case", PATHOLOGICAL)
def test_pathological_content(
    target: str,
    case: str,
    originals: Originals,
    tmp_path: Path,
    capsys: Any,
    sentinel: Callable[[str], None],
    no_checksums: None,
) -> None:
    """Deep nesting, huge declared sizes, complex / integer / NaN tensors, code in a pickle...: refused
    in one line naming the file (or accepted where the reference parser accepts it and it is valid)."""
    t = TARGETS[target]
    sentinel(t.work)
    bad = t.pathological[case](originals)
    argv, name = t.install(bad, tmp_path, originals)
    unreadable = t.parse is None or refuses(t.parse)(bad)
    check(argv, name, unreadable or t.always_invalid, capsys, named=unreadable or t.names_valid)
