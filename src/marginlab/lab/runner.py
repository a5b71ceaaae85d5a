"""Run an experiment config into a run directory, or resume one, or skip it; redraw its figures.

This is the one place that decides *run, resume or skip*: ``marginlab run``, the sub-runs of a
comparison and the runs of a sweep all go through :func:`run_or_resume`. The runner knows experiments
only through the :class:`Experiment` protocol and the :data:`EXPERIMENTS` table, which
:mod:`marginlab.experiments` fills (the runner sits below the experiments it runs). A run that fails is
removed only
when nothing in it ever finished (:meth:`RunDir.holds_work`); anything else stays for ``--resume``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from marginlab.base.config import from_dict, to_dict
from marginlab.base.distributed import is_main_process
from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import to_jsonable
from marginlab.lab.names import FIGURES
from marginlab.lab.provenance import check_model_files, model_files, record_session
from marginlab.lab.runs import RunDir, read_config

log = logging.getLogger(__name__)

Mode = Literal["new", "resume", "skip"]


class Experiment(Protocol):
    """What the runner needs of an experiment kind (a module of :mod:`marginlab.experiments`).

    - ``Config``: a frozen dataclass (the TOML minus ``kind``);
    - ``run(cfg, rd, *, resume)``: does the work, logs metrics into ``rd`` and returns the summary, a
      JSON-ready mapping, typed by each experiment (the runner draws the figures, then writes it as
      ``summary.json`` with ``kind`` in front: the summary is the last file of a run);
    - ``plot(run_dir)``: redraws every figure from the run directory's files alone.
    An optional ``resolve(cfg) -> cfg`` fills the values an experiment derives (e.g. the learning rate).
    """

    Config: type[Any]

    def run(self, cfg: Any, rd: RunDir, *, resume: bool) -> Mapping[str, object]:
        """Do the work into ``rd`` (``resume``: continue from its checkpoint); return the summary."""
        ...

    def plot(self, run_dir: Path) -> list[Path]:
        """Redraw every figure of the run directory ``run_dir`` from its files; return their paths."""
        ...


# kind -> experiment; filled by marginlab.experiments (each kind registers itself there).
EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(kind: str, experiment: Experiment) -> None:
    """Make ``experiment`` runnable as ``kind = "<kind>"`` in a config."""
    if kind in EXPERIMENTS:
        raise ValueError(f"experiment kind {kind!r} is registered twice")
    EXPERIMENTS[kind] = experiment


def get_experiment(kind: object) -> Experiment:
    """The experiment implementing ``kind``; unknown kinds raise :class:`ConfigError`."""
    if not isinstance(kind, str) or kind not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment kind {kind!r}; set kind = one of: {', '.join(sorted(EXPERIMENTS))}"
        )
    return EXPERIMENTS[kind]


def build_config(raw: dict[str, Any]) -> tuple[str, Any]:
    """Split ``kind`` off a raw config dict and build that experiment's frozen Config, every default
    resolved (an experiment's ``resolve(cfg)`` fills the values it derives, e.g. the learning rate)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a table, got {type(raw).__name__}")
    raw = dict(raw)
    kind = raw.pop("kind", None)
    if kind is None:
        raise ConfigError("config has no 'kind' key (e.g. kind = \"logreg-gd\")")
    exp = get_experiment(kind)
    cfg = from_dict(exp.Config, raw)
    resolve = getattr(exp, "resolve", None)
    return kind, resolve(cfg) if resolve is not None else cfg


def config_record(raw: dict[str, Any]) -> dict[str, Any]:
    """What ``config.json`` of a run of ``raw`` holds: the validated, resolved config as JSON values."""
    kind, cfg = build_config(raw)
    return to_jsonable({"kind": kind, **to_dict(cfg)})


def run_experiment(raw: dict[str, Any], out: str | Path, *, force: bool = False) -> Path:
    """Validate ``raw``, create the run directory ``out`` and run the experiment to completion."""
    kind, cfg = build_config(raw)
    if not is_main_process():  # a torchrun worker: it trains, rank 0 alone creates and writes `out`
        return _execute_worker(kind, cfg, RunDir(out), resume=False)
    record = to_jsonable({"kind": kind, **to_dict(cfg)})
    rd = RunDir.create(out, record, force=force)
    try:
        record_session(rd.path, "new", record)  # with the SHA-256 of the user's model file, if any
        return _execute(kind, cfg, rd, resume=False)
    except BaseException:
        # Nothing finished (no checkpoint, weights, summary or result anywhere inside, sub-runs
        # included): nothing worth resuming, so leave no half-made directory behind.
        if not rd.holds_work():
            rd.unlock()
            shutil.rmtree(rd.path, ignore_errors=True)
        raise


def resume_experiment(path: str | Path, *, force: bool = False) -> Path:
    """Continue an unfinished run from its last checkpoint (its config is read from the directory).

    A run whose model file (``model.name = "FILE.py:Class"``) changed since it started is refused before
    that file is imported (it would train another architecture from the checkpoint); ``force`` resumes
    with the file as it is, and records its new SHA-256."""
    rd = RunDir.open(path)
    if rd.finished:
        raise RunDirError(f"{rd.path} is already finished; nothing to resume")
    raw = read_config(rd.path)
    if not force:
        check_model_files(rd.path, raw)
    kind, cfg = build_config(raw)
    if not is_main_process():
        return _execute_worker(kind, cfg, rd, resume=True)
    rd.lock()
    try:
        record_session(rd.path, "resume", raw)
    except BaseException:
        rd.unlock()
        raise
    return _execute(kind, cfg, rd, resume=True)


def plan(raw: dict[str, Any], path: str | Path) -> Mode:
    """What :func:`run_or_resume` will do with ``path``: ``new``, ``resume`` or ``skip`` (finished).

    A directory holding a *different* config is a user error (never overwritten, never skipped). A
    finished run of the same config is skipped without importing the user's model file, if possible
    (:func:`finished_with`)."""
    if finished_with(raw, path):
        return "skip"
    return plan_mode(path, config_record(raw))


# A registry model standing in for the user's model file when a finished run's config is compared
# (:func:`finished_with`): its config resolves without importing anything.
_STAND_IN_MODEL = "mlp"


def finished_with(raw: dict[str, Any], path: str | Path) -> bool:
    """Whether ``path`` holds a finished run of ``raw``, decided without importing the user's code.

    Validating a config whose ``model.name`` is ``FILE.py:Class`` imports that file (to check the options
    against its signature), running whatever it does at import, only to skip the run. So when the model
    section is exactly the recorded one, the rest is compared with a registry model standing in for it on
    both sides. ``False`` means "not decided here": :func:`plan_mode` decides, validating in full."""
    rd = RunDir(path)
    if not (rd.is_run_dir and rd.finished):
        return False
    saved = read_config(rd.path)
    model, saved_model = raw.get("model"), saved.get("model")
    if not (isinstance(model, dict) and isinstance(saved_model, dict)) or not model_files(raw):
        return False  # no model file: validating the config imports nothing of the user's
    if to_jsonable({"options": {}, **model}) != saved_model:
        return False
    try:
        stand_in = config_record({**raw, "model": {"name": _STAND_IN_MODEL}})
    except ConfigError:
        return False
    return stand_in == {**saved, "model": stand_in.get("model")}


def plan_mode(path: str | Path, expected: dict[str, Any]) -> Mode:
    """:func:`plan` for a run whose ``config.json`` must equal ``expected`` (the sweep's fake runs use
    this directly). A run directory without a checkpoint is resumed too: it starts over in place."""
    rd = RunDir(path)
    if not rd.is_run_dir:
        return "new"
    if read_config(rd.path) != expected:
        raise RunDirError(
            f"{rd.path} holds a run with a different config; choose another --out or move that directory away"
        )
    return "skip" if rd.finished else "resume"


def run_or_resume(raw: dict[str, Any], path: str | Path) -> Mode:
    """Run ``raw`` into ``path``, resume it there, or skip it when it already finished."""
    mode = plan(raw, path)
    if mode == "skip":
        log.info("skipping finished run %s", path)
    elif mode == "resume":
        log.info("resuming run %s", path)
        resume_experiment(path)
    else:
        log.info("starting run %s", path)
        run_experiment(raw, path)
    return mode


def _execute_worker(kind: str, cfg: Any, rd: RunDir, *, resume: bool) -> Path:
    """Ranks > 0 of a data-parallel run: take part in training, never lock or write the directory."""
    get_experiment(kind).run(cfg, rd, resume=resume)
    return rd.path


def _execute(kind: str, cfg: Any, rd: RunDir, *, resume: bool) -> Path:
    exp = get_experiment(kind)
    try:
        if resume:
            rd.remove_temp_files()  # leftovers of atomic writes that a kill interrupted
        summary = exp.run(cfg, rd, resume=resume)
        # The figures first, the summary last: its presence marks the run finished, so a kill while
        # plotting leaves an unfinished run, which --resume completes (from the last checkpoint, the
        # figures drawn, then the summary written); nothing finished is lost, as the checkpoint stays.
        exp.plot(rd.path)
        rd.write_summary({"kind": kind, **summary})
    finally:
        rd.unlock()
    return rd.path


def plot_run(path: str | Path) -> list[Path]:
    """Redraw every figure of a run directory from its files alone, holding the run's lock (a run that
    another process is writing is refused: "in use"); the temporary files that a writer killed while
    drawing left under ``figures/`` are removed first."""
    rd = RunDir.open(path)
    kind = read_config(rd.path).get("kind")
    exp = get_experiment(kind)
    with rd:
        rd.remove_temp_files(FIGURES)
        return list(exp.plot(rd.path))
