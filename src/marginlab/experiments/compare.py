"""Experiment ``compare``: training recipes side by side, trained with the same seeds.

For every base experiment (a ``train`` preset, e.g. ``mnist-mlp-quick``) and every recipe (any of
:data:`marginlab.training.recipes.RECIPES`; by default ``standard``, ``constraint``, ``regularized``) and
seed, one complete ``train`` sub-run is made inside the compare run directory,
``runs/<base>/<recipe>-seed<k>/`` (:func:`marginlab.lab.runner.run_or_resume`: finished ones are skipped on
``--resume``, unfinished ones resumed from their checkpoint). Before the first sub-run trains,
every base's data are loaded and its model built once, so a missing dataset in the last base fails at
once instead of after hours of training; an interrupted comparison never loses a finished sub-run.
Each trained model is then evaluated on a fixed seeded subset of test points
(:func:`marginlab.robustness.robust_accuracy`: a min-norm bound, PGD, then AutoAttack) into the
sub-run's ``robustness.json``. Finally ``table.csv``/``table.md``/``sweep.csv`` (per base the recipes side
by side, :mod:`.compare_tables`) and a summary (:mod:`.compare_verdicts`) that says per base, either way,
which recipe beats ``standard`` on mean margin, robust and certified accuracy, at what training cost, and
the ablations (``regularized`` vs ``constraint`` and vs ``large-margin``).

The resolved base configs (preset file + overrides) are embedded in ``config.json``, so a compare run can
be resumed or reproduced even after the preset files change.
"""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from marginlab.base.distributed import is_main_process
from marginlab.base.errors import ConfigError, MarginlabError
from marginlab.base.seed import torch_threads
from marginlab.data import load_dataset, load_points
from marginlab.data.base import Dataset
from marginlab.experiments.compare_config import BaseConfig, Config, RobustnessConfig, subrun_config
from marginlab.experiments.compare_results import collect
from marginlab.experiments.compare_tables import write_tables
from marginlab.experiments.compare_verdicts import summarize
from marginlab.lab.launchers import Launcher
from marginlab.lab.runner import run_or_resume
from marginlab.lab.runs import ROBUSTNESS, SUMMARY, WEIGHTS, RunDir, read_config, subrun_dir
from marginlab.lab.slurm import make_launcher
from marginlab.nets.loading import load_model
from marginlab.nets.models import build_model
from marginlab.plots.compare import plot_compare
from marginlab.robustness import robust_accuracy

log = logging.getLogger(__name__)


def run(cfg: Config, rd: RunDir, *, resume: bool) -> dict[str, Any]:
    """Train every sub-run, evaluate its robustness, write the tables; return the summary.

    Seeds are the outer loop (after each seed every recipe has a finished sub-run, so an interrupted
    comparison already holds paired results). ``cfg.jobs > 1`` trains that many sub-runs at once, each
    in its own spawned process with ``cpu_count // jobs`` threads (:mod:`marginlab.lab.workers`);
    ``cfg.launcher == "slurm"`` trains them as one SLURM array job (:mod:`marginlab.lab.slurm`; sub-runs
    already evaluated are not submitted). A failed sub-run is reported after the others have finished."""
    check_bases(cfg)
    todo = [
        (
            subrun_config(base, recipe, seed, cfg.params.get(recipe)),
            subrun_dir(rd.path, base.name, recipe, seed),
            "",
        )
        for base in cfg.bases
        for seed in cfg.seeds
        for recipe in cfg.recipes
    ]
    run_one = SubRun({b.name: b for b in cfg.bases}, cfg.robustness)
    if cfg.launcher == "local" and cfg.jobs == 1:
        for raw, path, mode in todo:
            run_one(raw, path, mode)  # in this process: errors and tracebacks as they are
    else:
        evaluated = [_evaluated(path) for _, path, _ in todo]
        for (raw, path, mode), done in zip(todo, evaluated, strict=True):
            if done:  # nothing left to do but check: not worth a worker or a SLURM task
                run_one(raw, path, mode)
        launcher = make_launcher(cfg.launcher, jobs=cfg.jobs, slurm=cfg.slurm)
        rest = [job for job, done in zip(todo, evaluated, strict=True) if not done]
        _run_parallel(rest, run_one, launcher, rd.path)
    rows = collect(cfg, rd.path)
    summary = summarize(cfg, rd.path, rows)
    write_tables(cfg, rd.path, rows, summary)
    return summary


@dataclass(frozen=True)
class SubRun:
    """Train (or resume, or skip) one sub-run and evaluate its robustness; picklable for worker processes.
    The base is the sub-run directory's parent (:func:`marginlab.lab.runs.subrun_dir`)."""

    bases: dict[str, BaseConfig]
    robustness: RobustnessConfig

    def __call__(self, raw: dict[str, Any], path: Path, mode: str) -> None:
        run_or_resume(raw, path)
        if not is_main_process():  # one process per GPU trained it (SLURM); rank 0 alone evaluates it
            return
        with torch_threads(raw.get("train", {}).get("threads")):  # the attacks too, as the training
            evaluate_subrun(path, self.bases[path.parent.name], self.robustness)


def _evaluated(path: Path) -> bool:
    """Whether a sub-run finished and its robustness was evaluated (a rerun only checks it)."""
    return (path / SUMMARY).is_file() and (path / ROBUSTNESS).is_file()


def _run_parallel(
    todo: list[tuple[dict[str, Any], Path, str]], run_one: SubRun, launcher: Launcher, home: Path
) -> None:
    """Run the sub-runs with ``launcher`` (worker processes, or a SLURM array whose files live in
    ``home``); raise the first failure once nothing else is running. An interruption (Ctrl-C, SIGTERM)
    kills local workers (SLURM jobs go on): their sub-runs resume from their checkpoints."""
    failures: list[str] = []
    with closing(launcher.execute(todo, run_one, home)) as events:
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
    for base in cfg.bases:
        data, model = base.config.get("data", {}), base.config.get("model", {})
        data_dir: str | None = data.get("data_dir") or None
        spec = data.get("dataset", "mnist")
        try:
            train = load_dataset(
                spec, "train", n=data.get("n_train"), seed=data.get("seed", 0), data_dir=data_dir
            )
            load_dataset(spec, "test", data_dir=data_dir)
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


def load_subrun(path: Path, n: int, seed: int) -> tuple[torch.nn.Module, Dataset, torch.Tensor]:
    """The trained model of the sub-run ``path`` (its ``config.json`` and weights, in eval mode) and
    ``n`` fixed test points of its dataset drawn with ``seed``: ``(model, points, index [n])``."""
    tcfg = read_config(path)
    data = tcfg.get("data", {})
    test, index = load_points(
        data.get("dataset", "mnist"), "test", n=n, seed=seed, data_dir=data.get("data_dir")
    )
    model_cfg = tcfg.get("model", {})
    loaded = load_model(
        model_cfg.get("name", "mnist-mlp"),
        path / WEIGHTS,
        num_classes=test.num_classes,
        input_shape=test.input_shape,
        options=model_cfg.get("options"),
    )
    return loaded.model.eval(), test, index


def evaluate_subrun(path: Path, base: BaseConfig, rc: RobustnessConfig) -> None:
    """Robustness of a finished sub-run's model on the fixed test subset into ``robustness.json``."""
    out = path / ROBUSTNESS
    if out.is_file():
        return
    model, test, index = load_subrun(path, rc.n, rc.seed)
    ref = base.reference_eps
    log.info("evaluating robustness of %s at eps %s", path, rc.eps_for(ref))
    result = robust_accuracy(model, test.x, test.y, rc.eps_for(ref), rc.settings_for(ref), index=index)
    result.save(out, reference_eps=ref)


def plot(run_dir: Path) -> list[Path]:
    """Redraw the comparison's figures from its files (see :mod:`marginlab.plots.compare`)."""
    return plot_compare(run_dir)
