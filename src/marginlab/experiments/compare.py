"""Experiment ``compare``: the reference's three recipes side by side, trained with the same seeds.

For every base experiment (a ``train`` preset, e.g. ``mnist-mlp-quick``) and every recipe (``standard``,
``constraint``, ``regularized``) and seed, one complete ``train`` sub-run is made inside the compare run
directory, ``runs/<base>/<recipe>-seed<k>/`` (:func:`marginlab.runner.run_or_resume`: finished ones are
skipped on ``--resume``, unfinished ones resumed from their checkpoint). Before the first sub-run trains,
every base's data are loaded and its model built once, so a missing dataset in the last base fails at
once instead of after hours of training; an interrupted comparison never loses a finished sub-run.
Each trained model is then evaluated on a fixed seeded subset of test points
(:func:`marginlab.robustness.robust_accuracy`: a min-norm bound, PGD, then AutoAttack) into the
sub-run's ``robustness.json``. Finally ``table.csv``/``table.md``/``sweep.csv`` and a summary that says per
base whether ``regularized`` beats ``standard`` on mean margin and on robust accuracy, either way.

The resolved base configs (preset file + overrides) are embedded in ``config.json``, so a compare run can
be resumed or reproduced even after the preset files change.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from marginlab.config import check_positive, load_toml, merge_overrides, require
from marginlab.errors import ConfigError, MarginlabError
from marginlab.regularizers import RECIPES
from marginlab.runs import ROBUSTNESS, WEIGHTS, RunDir, subrun_dir

if TYPE_CHECKING:
    from marginlab.robustness import RobustnessSettings

log = logging.getLogger(__name__)

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
        return str(self.config.get("model", {}).get("name", "mnist-mlp"))

    @property
    def reference_eps(self) -> float:
        return self.eps if self.eps is not None else REFERENCE_EPS[self.model_name]


@dataclass(frozen=True)
class RobustnessConfig:
    """How every trained model is attacked: ``n`` test points drawn with ``seed``; ``sweep``: radii as
    multiples of each base's reference eps; ``autoattack_at``: AutoAttack at the reference eps only
    (cheaper) or at every radius; PGD's step as ``step_size_rel`` times the reference eps, when set.
    Every other key is a field of :class:`marginlab.robustness.RobustnessSettings` (``norm``,
    ``attacks``, ``bound`` — ``"none"`` for none —, ``bound_params``, ``steps``, ``step_size``,
    ``aa_version``, ``aa_attacks``, ``aa_iters``, ``batch_size``, ``tol``); left out, it takes that
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
        from marginlab.robustness import RobustnessSettings

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
    """The ``compare`` experiment: bases × recipes × seeds, then robustness of every trained model."""

    bases: tuple[BaseConfig, ...] = ()
    recipes: tuple[str, ...] = ("standard", "constraint", "regularized")
    seeds: tuple[int, ...] = (0,)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    jobs: int = 1

    def __post_init__(self) -> None:
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
        for base in self.bases:
            for r in self.recipes:
                subrun_config(base, r, self.seeds[0])  # each must build (e.g. gamma known) before training
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds must be distinct")


def subrun_config(base: BaseConfig, recipe: str, seed: int) -> dict[str, Any]:
    """The ``train`` config of one sub-run: the base with ``seed`` and ``recipe`` (validated)."""
    from marginlab.runner import build_config

    raw = merge_overrides(base.config, {})  # a deep copy
    shared = raw.get("regularizer", {})
    terms = RECIPES[recipe]
    reg = {
        k: v
        for k, v in shared.items()
        if k != "recipe" and _TERM_OF_KEY.get(k, terms[0] if terms else "") in terms or k == "seed"
    }
    raw["regularizer"] = {**reg, "recipe": recipe}
    raw["seed"] = seed
    try:
        build_config(raw)
    except ConfigError as e:
        raise ConfigError(f"base {base.name!r}, recipe {recipe!r}: {e}") from None
    return raw


def run(cfg: Config, rd: RunDir, *, resume: bool) -> dict[str, Any]:
    """Train every sub-run, evaluate its robustness, write the tables; return the summary.

    Seeds are the outer loop (after each seed every recipe has a finished sub-run, so an interrupted
    comparison already holds paired results). ``cfg.jobs > 1`` trains that many sub-runs at once, each
    in its own spawned process with ``cpu_count // jobs`` threads (:mod:`marginlab.sweep.workers`); a
    failed sub-run is reported after the others running beside it have finished."""
    from marginlab.experiments.compare_tables import summarize, write_tables

    check_bases(cfg)
    todo = [
        (subrun_config(base, recipe, seed), subrun_dir(rd.path, base.name, recipe, seed), "")
        for base in cfg.bases
        for seed in cfg.seeds
        for recipe in cfg.recipes
    ]
    run_one = SubRun({b.name: b for b in cfg.bases}, cfg.robustness)
    if cfg.jobs == 1:
        for raw, path, mode in todo:
            run_one(raw, path, mode)  # in this process: errors and tracebacks as they are
    else:
        _run_parallel(todo, run_one, cfg.jobs)
    write_tables(cfg, rd.path)
    return summarize(cfg, rd.path)


@dataclass(frozen=True)
class SubRun:
    """Train (or resume, or skip) one sub-run and evaluate its robustness; picklable for worker processes.
    The base is the sub-run directory's parent (:func:`marginlab.runs.subrun_dir`)."""

    bases: dict[str, BaseConfig]
    robustness: RobustnessConfig

    def __call__(self, raw: dict[str, Any], path: Path, mode: str) -> None:
        from marginlab.runner import run_or_resume
        from marginlab.seed import torch_threads

        run_or_resume(raw, path)
        with torch_threads(raw.get("train", {}).get("threads")):  # the attacks too, as the training
            evaluate_subrun(path, self.bases[path.parent.name], self.robustness)


def _run_parallel(todo: list[tuple[dict[str, Any], Path, str]], run_one: SubRun, jobs: int) -> None:
    """Run the sub-runs ``jobs`` at a time; raise the first failure once nothing else is running.
    An interruption (Ctrl-C, SIGTERM) kills the workers: their sub-runs resume from their checkpoints."""
    from contextlib import closing

    from marginlab.sweep.workers import execute

    failures: list[str] = []
    with closing(execute(todo, run_one, jobs)) as events:
        for i, outcome in events:
            path = todo[i][1]
            if outcome is None:
                log.info("started sub-run %s", path)
            elif outcome.error is None:
                log.info("finished sub-run %s (%.0f s)", path, outcome.seconds or 0.0)
            else:
                if outcome.traceback:
                    log.debug("sub-run %s failed:\n%s", path, outcome.traceback)
                failures.append(f"sub-run {path} failed: {outcome.error}")
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise MarginlabError(failures[0] + more)


def check_bases(cfg: Config) -> None:
    """Load every base's data and build its model once, before anything trains (see the module doc).

    Loaded splits are cached in this process, so the sub-runs do not read them again."""
    import torch

    from marginlab.data import load_dataset
    from marginlab.models import build_model

    for base in cfg.bases:
        data, model = base.config.get("data", {}), base.config.get("model", {})
        kw = {"data_dir": data.get("data_dir") or None}
        spec = data.get("dataset", "mnist")
        try:
            train = load_dataset(spec, "train", n=data.get("n_train"), seed=data.get("seed", 0), **kw)
            load_dataset(spec, "test", **kw)
            net = build_model(
                model.get("name", "mnist-mlp"),
                num_classes=train.num_classes,
                input_shape=train.input_shape,
                **model.get("options", {}),
            )
            with torch.no_grad():
                net.eval()(train.x[:1])
        except ConfigError as e:
            raise type(e)(f"base {base.name!r}: {e}") from None
        except Exception as e:  # DataError and friends: name the base, keep the one line
            if isinstance(e, MarginlabError):
                raise type(e)(f"base {base.name!r}: {e}") from None
            raise


def evaluate_subrun(path: Path, base: BaseConfig, rc: RobustnessConfig) -> None:
    """Robustness of a finished sub-run's model on the fixed test subset into ``robustness.json``."""
    from marginlab.data import load_points
    from marginlab.model_io import load_model
    from marginlab.robustness import robust_accuracy
    from marginlab.runs import read_config

    out = path / ROBUSTNESS
    if out.is_file():
        return
    tcfg = read_config(path)
    data = tcfg.get("data", {})
    test, index = load_points(
        data.get("dataset", "mnist"), "test", n=rc.n, seed=rc.seed, data_dir=data.get("data_dir")
    )
    model_cfg = tcfg.get("model", {})
    loaded = load_model(
        model_cfg.get("name", "mnist-mlp"),
        path / WEIGHTS,
        num_classes=test.num_classes,
        input_shape=test.input_shape,
        options=model_cfg.get("options"),
    )
    ref = base.reference_eps
    log.info("evaluating robustness of %s at eps %s", path, rc.eps_for(ref))
    result = robust_accuracy(loaded.model, test.x, test.y, rc.eps_for(ref), rc.settings_for(ref), index=index)
    result.save(out, reference_eps=ref)


def plot(run_dir: Path) -> list[Path]:
    """Redraw the comparison's figures from its files (see :mod:`marginlab.plots.compare`)."""
    from marginlab.plots.compare import plot_compare

    return plot_compare(run_dir)
