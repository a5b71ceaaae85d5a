"""The ``compare`` experiment's config: bases (train presets) × recipes × seeds, and how every trained model
is attacked. Kept apart from :mod:`marginlab.experiments.compare` so that its tables and verdicts can
name the config without importing the experiment that uses them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from marginlab.base.config import check_positive, load_toml, merge_overrides, require
from marginlab.base.errors import ConfigError
from marginlab.lab.launchers import SlurmConfig, check_launcher
from marginlab.lab.runner import build_config
from marginlab.robustness import RobustnessSettings
from marginlab.training.recipes import RECIPES

CONFIGS_DIR = Path(__file__).resolve().parents[3] / "configs"  # the project's presets (source checkout)
# Reference L2 radii (docs/reference-settings.md); MNIST-LR has none in the reference: 1.0 is ours.
REFERENCE_EPS = {"mnist-lr": 1.0, "mnist-mlp": 1.0, "mnist-cnn": 2.0, "cifar-cnn": 0.4}
# Regularizer keys that only make sense for recipes with that term (a base may set them once for all).
_TERM_OF_KEY = {
    "lam": "average-margin",
    "gamma": "average-margin",
    "normalized": "average-margin",
    "beta": "orthogonality",
    "ortho_layers": "orthogonality",
    "ortho_every": "orthogonality",
    "ortho_probes": "orthogonality",
}


def find_preset(preset: str) -> Path:
    """A preset file: a path as given, else ``configs/<preset>.toml`` of the project."""
    for path in (Path(preset), CONFIGS_DIR / preset, CONFIGS_DIR / f"{preset}.toml"):
        if path.is_file():
            return path
    raise ConfigError(
        f"preset {preset!r} not found (as a path or in {CONFIGS_DIR}); give a train config file"
    )


@dataclass(frozen=True)
class BaseConfig:
    """One base experiment. ``preset``: a ``train`` config file or preset name; ``overrides``: dotted keys
    applied to it (``{"train.epochs" = 5}``); ``eps``: the reference radius (``None``: by model name);
    ``config``: the resolved ``train`` config, filled from the preset when loading and kept in config.json.
    A ``[regularizer]`` table in the base applies to every recipe that has the term (e.g. ``gamma``)."""

    name: str
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    eps: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(
            bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)),
            f"base name {self.name!r} must be a plain directory name (letters, digits, . _ -)",
        )
        if not self.config:
            require(self.preset is not None, f"base {self.name!r} needs a preset (a train config file)")
            raw = merge_overrides(load_toml(find_preset(str(self.preset))), self.overrides)
            object.__setattr__(self, "config", raw)
        require(
            self.config.get("kind") == "train", f'base {self.name!r}: its config must have kind = "train"'
        )
        check_positive(f"bases.{self.name}.eps", self.eps)
        if self.eps is None and self.model_name not in REFERENCE_EPS:
            raise ConfigError(f"base {self.name!r}: no reference eps for model {self.model_name!r}; set eps")

    @property
    def model_name(self) -> str:
        """The base's model name (``model.name`` of its train config; ``mnist-mlp`` when unset)."""
        return str(self.config.get("model", {}).get("name", "mnist-mlp"))

    @property
    def reference_eps(self) -> float:
        """The radius the verdicts compare at: ``eps`` if given, else the reference's for the model."""
        return self.eps if self.eps is not None else REFERENCE_EPS[self.model_name]


@dataclass(frozen=True)
class RobustnessConfig:
    """How every trained model is attacked: ``n`` test points drawn with ``seed``; ``sweep``: radii as
    multiples of each base's reference eps; ``autoattack_at``: AutoAttack at the reference eps only
    (cheaper) or at every radius; PGD's step as ``step_size_rel`` times the reference eps, when set.
    Every other key is a field of :class:`marginlab.robustness.RobustnessSettings` (``norm``,
    ``attacks``, ``bound`` — ``"none"`` for none —, ``bound_params``, ``steps``, ``step_size``,
    ``aa_version``, ``aa_attacks``, ``aa_iters``, ``batch_size``, ``tol``, ``certify`` — ``"off"`` for no
    certificates —, ``certify_params``); left out, it takes that
    class's default (docs/reference-settings.md), the same as ``marginlab robustness`` and the Python API.
    Each sub-run's ``robustness.json`` records the settings used."""

    n: int = 500
    seed: int = 0
    sweep: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    autoattack_at: Literal["reference", "all"] = "all"
    step_size_rel: float | None = None
    norm: Literal["L2", "Linf"] | None = None
    attacks: tuple[str, ...] | None = None
    bound: str | None = None
    bound_params: dict[str, Any] | None = None
    steps: int | None = None
    step_size: float | None = None
    aa_version: Literal["standard", "plus", "custom"] | None = None
    aa_attacks: tuple[str, ...] | None = None
    aa_iters: int | None = None
    batch_size: int | None = None
    tol: float | None = None
    certify: str | None = None
    certify_params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_positive("robustness.n", self.n)
        check_positive("robustness.step_size_rel", self.step_size_rel)
        require(
            all(f > 0 for f in self.sweep), "robustness.sweep holds positive multiples of the reference eps"
        )
        try:
            self.settings_for(1.0)  # every attack setting checked now, before anything trains
        except ConfigError as e:
            raise ConfigError(f"robustness: {e}") from None

    def settings_for(self, reference: float) -> RobustnessSettings:
        """The evaluation settings of a base whose reference radius is ``reference``."""
        own = ("n", "seed", "sweep", "autoattack_at", "step_size_rel")
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in own}
        kw = {k: v for k, v in kw.items() if v is not None}
        if self.step_size_rel is not None:
            kw["step_size"] = self.step_size_rel * reference
        if self.autoattack_at == "reference":
            kw["aa_eps"] = (reference,)
        return RobustnessSettings(seed=self.seed, **kw)

    def eps_for(self, reference: float) -> list[float]:
        """The radii evaluated for a base: the reference eps and the sweep (rounded to 6 digits)."""
        return sorted({round(reference * f, 6) for f in (*self.sweep, 1.0)})


@dataclass(frozen=True)
class Config:
    """The ``compare`` experiment: bases × recipes × seeds, then robustness of every trained model.

    ``params``: per recipe, its objective's parameters for every base (TOML ``[params.pgd-at]``,
    ``eps = 0.1``...); unset ones take the objective's reference values for each base's dataset.
    ``launcher``: ``"local"`` (``jobs`` worker processes) or ``"slurm"`` (one SLURM array job, a task per
    sub-run, settings in the ``[slurm]`` table: :class:`marginlab.lab.launchers.SlurmConfig`)."""

    bases: tuple[BaseConfig, ...] = ()
    recipes: tuple[str, ...] = ("standard", "constraint", "regularized")
    seeds: tuple[int, ...] = (0,)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    jobs: int = 1
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    launcher: str = "local"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        check_launcher(self.launcher)
        require(
            self.launcher == "local" or self.jobs == 1,
            "jobs is for the local launcher; with slurm set slurm.array_parallelism",
        )
        require(bool(self.bases), "compare needs at least one [[bases]] entry (a train preset)")
        require(
            isinstance(self.jobs, int) and not isinstance(self.jobs, bool) and self.jobs >= 1,
            f"jobs must be a positive integer (sub-runs trained at once), got {self.jobs!r}",
        )
        names = [b.name for b in self.bases]
        require(len(set(names)) == len(names), f"base names must be distinct, got {names}")
        require(
            bool(self.recipes) and len(set(self.recipes)) == len(self.recipes), "recipes must be distinct"
        )
        for r in self.recipes:
            require(r in RECIPES, f"unknown recipe {r!r}; choose from: {', '.join(RECIPES)}")
        for r, params in self.params.items():
            require(r in self.recipes, f"params.{r}: {r!r} is not one of the recipes {list(self.recipes)}")
            require(isinstance(params, dict), f"params.{r} must be a table of the recipe's parameters")
        for base in self.bases:
            for r in self.recipes:
                # each must build (e.g. gamma known, params valid) before anything trains
                subrun_config(base, r, self.seeds[0], self.params.get(r))
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds must be distinct")


def subrun_config(
    base: BaseConfig, recipe: str, seed: int, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``train`` config of one sub-run: the base with ``seed``, ``recipe`` and the recipe's objective
    ``params`` (validated; a base may not set ``regularizer.params``: they belong to one recipe)."""
    raw = merge_overrides(base.config, {})  # a deep copy
    shared = raw.get("regularizer", {})
    if shared.get("params"):
        raise ConfigError(
            f"base {base.name!r}: regularizer.params would apply to every recipe; "
            "set each recipe's in the compare config's [params.<recipe>] table"
        )
    terms = RECIPES[recipe].terms
    reg = {
        k: v
        for k, v in shared.items()
        if k not in ("recipe", "params")
        and (_TERM_OF_KEY.get(k, terms[0] if terms else "") in terms or k == "seed")
    }
    raw["regularizer"] = {**reg, "recipe": recipe, **({"params": dict(params)} if params else {})}
    raw["seed"] = seed
    try:
        build_config(raw)
    except ConfigError as e:
        raise ConfigError(f"base {base.name!r}, recipe {recipe!r}: {e}") from None
    return raw
