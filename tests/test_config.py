"""Config parsing: TOML, dotted overrides, strict dataclass building."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from marginlab.base.config import apply_overrides, from_dict, load_toml, parse_value, to_dict
from marginlab.base.errors import ConfigError


@dataclass(frozen=True)
class Train:
    epochs: int = 3
    lr: float = 0.01
    nesterov: bool = True


@dataclass(frozen=True)
class Cfg:
    seed: int = 0
    data: str = "digits"
    estimators: tuple[str, ...] = ("first-order",)
    norm: Literal["L2", "Linf"] = "L2"
    n: int | None = None
    train: Train = field(default_factory=Train)


def test_overrides_parse_toml_values_and_nest():
    raw = apply_overrides({"train": {"epochs": 3}}, ["train.epochs=5", "train.lr=1e-3", "data=mnist:0,1"])
    assert raw == {"train": {"epochs": 5, "lr": 1e-3}, "data": "mnist:0,1"}
    assert parse_value("[1, 2]") == [1, 2] and parse_value("true") is True and parse_value("abc") == "abc"


def test_from_dict_builds_nested_and_tuples():
    cfg = from_dict(Cfg, {"train": {"lr": 1}, "estimators": ["a", "b"], "n": 10})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.estimators == ("a", "b") and cfg.n == 10
    assert to_dict(cfg)["estimators"] == ["a", "b"]
    assert from_dict(Cfg, to_dict(cfg)) == cfg  # round trip through config.json


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"trian": {}}, "unknown config key 'trian'"),
        ({"train": {"epoch": 1}}, "unknown config key 'train.epoch'"),
        ({"train": {"epochs": 1.5}}, "'train.epochs' must be an integer"),
        ({"train": {"epochs": True}}, "'train.epochs' must be an integer"),
        ({"train": {"lr": "fast"}}, "'train.lr' must be a number"),
        ({"train": {"lr": float("nan")}}, "'train.lr' must be finite"),
        ({"train": {"nesterov": 1}}, "'train.nesterov' must be true or false"),
        ({"norm": "L3"}, "'norm' must be one of"),
        ({"train": 3}, "train must be a table"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_from_dict_rejects_bad_input(raw, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_load_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = [1,\n")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])
