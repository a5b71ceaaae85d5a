"""Estimator parameters, attack settings, seeds and other integers are checked (type and range) before any
work starts: a wrong one is a one-line error (exit 2) naming the key, with no traceback and no output.

Three causes: ``--param`` / ``tracking.params`` values were passed to the estimators unchecked (``steps=abc``
crashed, ``steps=-1`` gave ``inf`` everywhere); integers too large for torch / numpy (seeds, epochs, batch
sizes) overflowed deep inside or ran forever; attack settings accepted an infinite step size."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import margin_values, tiny_train_toml, untrained_mlp_weights, write_text
from marginlab.base.config import from_dict
from marginlab.base.errors import ConfigError
from marginlab.base.seed import MAX_SEED, check_seed, seed_everything
from marginlab.cli import main
from marginlab.estimators import build_estimator
from marginlab.estimators.base import validate_params
from marginlab.robustness.attacks import RobustnessSettings
from marginlab.training.tracking import TrackingConfig

HUGE = str(10**30)
# a usage error (argparse) names the sub-command; a user error found later does not
ERROR_LINE = re.compile(r"^marginlab( [a-z]+)?: error: ")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An (untrained) 64-16-10 MLP for 8x8 digits: only the errors matter here, not the margins."""
    return untrained_mlp_weights(tmp_path_factory.mktemp("w"), (16,))


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process; assert exit 2 and one error line without a traceback; return that line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors exit from inside the parser
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]) and "Traceback" not in err, err
    return lines[0]


def _model_args(weights: Path) -> list[str]:
    return ["--model", "mlp", "--option", "widths=[16]", "--weights", str(weights), "--data", "digits",
            "--n", "8"]  # fmt: skip


BAD_PARAMS = [
    ("ddn.steps=abc", "ddn.steps"),  # was a TypeError traceback from inside foolbox
    ("ddn.steps=-1", "ddn.steps"),  # was exit 0 with every margin inf
    ("ddn.steps=1.5", "ddn.steps"),
    (f"ddn.steps={HUGE}", "ddn.steps"),
    ("ddn.gamma=nan", "ddn.gamma"),
    ("ddn.gamma=1.5", "ddn.gamma"),
    ("ddn.init_epsilon=0", "ddn.init_epsilon"),
    ("ddn.batch_size=0", "ddn.batch_size"),
    ("deepfool.candidates=1", "deepfool.candidates"),
    ("deepfool.overshoot=-0.1", "deepfool.overshoot"),
    ("fmn.max_stepsize=0", "fmn.max_stepsize"),
    ("fmn.gamma=0", "fmn.gamma"),
    ("fab.n_restarts=0", "fab.n_restarts"),
    ("fab.eps=-1", "fab.eps"),
    ("fab.seed=-1", "fab.seed"),
    ("sampling.radius=0", "sampling.radius"),
    ("sampling.n_samples=0", "sampling.n_samples"),
    (f"sampling.seed={HUGE}", "sampling.seed"),
    ("best.attacks=3", "best.attacks"),  # was a TypeError traceback in the margins command
    ('best.attacks=["first-order"]', "first-order"),
    ("ddn.foo=1", "foo"),  # unknown keys and estimators: one line already, kept so
    ("fmn.steps=3", "fmn.steps"),  # fmn is not among the estimators (see below)
]


@pytest.mark.parametrize(("param", "needle"), BAD_PARAMS, ids=[p for p, _ in BAD_PARAMS])
def test_margins_rejects_bad_estimator_params(weights, tmp_path, capsys, param, needle):
    est = param.partition(".")[0]
    names = "first-order,ddn" if param == "fmn.steps=3" else f"first-order,{est}"
    out = tmp_path / "m"
    argv = ["margins", *_model_args(weights), "--estimators", names, "--param", param, "--out", str(out)]
    assert needle in _fails(argv, capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the summary


BAD_FLAGS = [
    (["--seed", "-1"], "--seed"),
    (["--seed", HUGE], "--seed"),  # was an overflow traceback in torch.Generator.manual_seed
    (["--seed", str(MAX_SEED + 1)], "--seed"),
    (["--batch-size", HUGE], "--batch-size"),  # was an overflow traceback in Tensor.split
    (["--n", HUGE], "--n"),  # beyond 64 bits: refused when parsed
]
ROBUSTNESS_FLAGS = [
    (["--steps", "-1"], "steps"),
    (["--steps", HUGE], "--steps"),  # PGD looped (practically) forever
    (["--step-size", "inf"], "step_size"),  # was exit 0 with nonsense accuracies
    (["--step-size", "nan"], "step_size"),
    (["--step-size", "0"], "step_size"),
    (["--aa-version", "custom"], "custom"),
]


@pytest.mark.parametrize(
    ("command", "flags", "needle"),
    [(c, f, n) for c in ("margins", "robustness") for f, n in BAD_FLAGS]
    + [("robustness", f, n) for f, n in ROBUSTNESS_FLAGS],
    ids=lambda v: " ".join(v)[:24] if isinstance(v, list) else v,
)
def test_commands_reject_out_of_range_flags(weights, tmp_path, capsys, command, flags, needle):
    out = tmp_path / ("rob" if command == "robustness" else "m")
    extra = ["--eps", "0.5", "--attacks", "pgd", "--steps", "2", "--bound", "none"]
    extra = extra if command == "robustness" else ["--estimators", "first-order"]
    argv = [command, *_model_args(weights), *extra, *flags, "--out", str(out)]
    assert needle in _fails(argv, capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (f"seed={2**63 - 1}", "seed"),  # overflowed in the tracking's derived seeds
        ("seed=-1", "seed"),
        (f"seed={HUGE}", "seed"),
        (f"train.epochs={HUGE}", "train.epochs"),  # ran (practically) forever
        ("tracking.estimators=['first-order','ddn']", None),  # valid alone: the params below are not
    ],
    ids=lambda v: str(v)[:20],
)
def test_run_rejects_huge_or_negative_ints(tmp_path, capsys, override, needle):
    config = write_text(tmp_path / "c.toml", tiny_train_toml())
    overrides = [override]
    if needle is None:  # estimator params in the config are checked when it is read
        overrides += ["tracking.params.ddn.steps=-1"]
        needle = "ddn.steps"
    out = tmp_path / "run"
    assert needle in _fails(["run", str(config), *overrides, "--out", str(out)], capsys)
    assert not out.exists()  # no run directory was created


def test_tracking_params_are_checked_at_config_time():
    base = {"estimators": ["first-order", "ddn"]}
    with pytest.raises(ConfigError, match=r"tracking\.params\.ddn.*steps"):
        from_dict(TrackingConfig, {**base, "params": {"ddn": {"steps": "abc"}}}, "tracking")
    with pytest.raises(ConfigError, match=r"ddn\.gamma"):
        from_dict(TrackingConfig, {**base, "params": {"ddn": {"gamma": 2.0}}}, "tracking")
    with pytest.raises(ConfigError, match="tracking.params.ddn"):
        from_dict(TrackingConfig, {**base, "params": {"ddn": 3}}, "tracking")
    ok = from_dict(TrackingConfig, {**base, "params": {"ddn": {"steps": 5}}}, "tracking")
    assert ok.params == {"ddn": {"steps": 5}}


def test_build_estimator_checks_types_and_ranges():
    with pytest.raises(ConfigError, match=r"'ddn\.steps' must be an integer"):
        build_estimator("ddn", steps="abc")
    with pytest.raises(ConfigError, match=r"ddn\.steps"):
        build_estimator("ddn", steps=0)
    with pytest.raises(ConfigError, match="has no parameter 'foo'"):
        build_estimator("ddn", foo=1)
    # valid values come back converted to the fields' types
    ddn = build_estimator("ddn", init_epsilon=1, steps=7)
    assert ddn.init_epsilon == 1.0 and isinstance(ddn.init_epsilon, float) and ddn.steps == 7
    assert build_estimator("best", attacks="ddn").attacks == ("ddn",)
    assert validate_params("fmn", {"max_stepsize": 2}) == {"max_stepsize": 2.0}
    assert validate_params("fmn", {"max_stepsize": None}) == {"max_stepsize": None}


def test_estimate_margins_checks_every_param_before_running_any_estimator():
    calls = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model.register_forward_hook(lambda *_: calls.append(1))
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ConfigError, match=r"ddn\.steps"):
        margin_values(model, x, y, ["first-order", "ddn"], params={"ddn": {"steps": -1}})
    assert calls == []  # first-order did not run first
    # a single attack name where a list is expected is one attack, not a list of characters
    got = margin_values(model, x, y, ["ddn", "best"], params={"best": {"attacks": "ddn"}})
    assert torch.equal(got["best"], got["ddn"])


def test_attack_settings_ranges():
    bad_values = [("step_size", math.inf), ("step_size", math.nan), ("step_size", 0.0), ("steps", 0),
                  ("steps", 2**63), ("steps", 2.5), ("batch_size", 0), ("seed", -1), ("seed", MAX_SEED + 1),
                  ("aa_iters", 0)]  # fmt: skip
    for key, value in bad_values:
        with pytest.raises(ConfigError, match=key):
            RobustnessSettings(**{key: value})
    assert RobustnessSettings(steps=3, step_size=0.5, seed=MAX_SEED).steps == 3


def test_seed_range_is_what_torch_and_numpy_accept():
    with pytest.raises(ConfigError, match="seed"):
        seed_everything(MAX_SEED + 1)
    with pytest.raises(ConfigError, match="seed"):
        check_seed(-1, "seed")
    with pytest.raises(ConfigError, match="seed"):
        check_seed(True, "seed")
    gen = seed_everything(MAX_SEED)  # the largest seed works in every library seeded
    assert np.random.get_state()[1][0] == np.random.RandomState(MAX_SEED).get_state()[1][0]
    again = torch.Generator().manual_seed(MAX_SEED)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=again))
