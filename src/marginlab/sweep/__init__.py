"""Sweeps: a cartesian grid of config overrides run as independent, restartable runs.

``run_sweep(base, ["train.lr=0.01,0.002", "seed=0,1,2"], out)`` makes one run directory per grid point,
named from its values (``out/lr=0.01,seed=0``), runs at most ``jobs`` of them at a time (spawned worker
processes; ``jobs=1`` runs in this process) or, with a SLURM ``launcher`` (:mod:`marginlab.lab.slurm`),
as one array job, and keeps three files in ``out`` current after every run:

- ``sweep.json``: the manifest (base config, grid, and per run its values, config, status and error);
- ``sweep.csv`` and ``sweep.md``: one row per run, grid values + status + scalar summary keys.

Restarting the same sweep skips finished runs (``summary.json`` present) and resumes unfinished ones
(from their checkpoint, or from the start, in place, when they have none): the runner's
:func:`marginlab.lab.runner.plan_mode` decides, as for ``marginlab run`` and comparisons. A run whose
directory holds a *different* config is a user error, not something to skip or overwrite. A failing run
never stops the sweep: it is recorded as ``failed`` with a one-line reason.

Stopping the sweep (Ctrl-C, SIGTERM) kills its workers and records the runs they were running as
``interrupted`` and the runs not started yet as ``pending``, never as ``failed``; the KeyboardInterrupt is
then re-raised (a :class:`SweepStopped` for SIGTERM). A killed sweep cannot write anything: its manifest
keeps saying ``running`` for those runs, and its workers die with it. Either way a rerun resumes them.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marginlab.base.deprecated import moved_attribute
from marginlab.base.errors import ConfigError, RunDirError
from marginlab.base.fsio import atomic_write_json, atomic_write_text, to_jsonable
from marginlab.base.tables import csv_text, format_cell, markdown_table, scalar_items, shared_keys
from marginlab.experiments import config_record, plan_mode, run_or_resume
from marginlab.lab.launchers import Launcher, LocalLauncher
from marginlab.lab.names import LOCK, SUMMARY, SWEEP_CSV, SWEEP_MANIFEST, SWEEP_MD
from marginlab.lab.readers import is_run_dir, read_summary_if_any
from marginlab.lab.runner import finished_with
from marginlab.lab.runs import RunDir, check_out_path
from marginlab.lab.stopping import SweepStopped, sigterm_stops_sweep, stop_signal
from marginlab.lab.workers import Outcome, RunFn
from marginlab.sweep.grid import SweepPoint, parse_grid, plan_sweep, run_name, split_values

__all__ = [
    "RunFn",
    "RunRecord",
    "SweepPoint",
    "SweepResult",
    "SweepStopped",
    "default_run",
    "parse_grid",
    "plan_sweep",
    "run_name",
    "run_sweep",
    "split_values",
    "stop_signal",
]


def __getattr__(name: str) -> Any:
    """Old names (``MANIFEST``, ``TABLE_CSV``, ``TABLE_MD``: now ``marginlab.lab.names.SWEEP_*``), with a
    DeprecationWarning."""
    return moved_attribute(__name__, name)


@dataclass
class RunRecord:
    """What happened to one grid point (``status``: pending, running, finished, failed or interrupted)."""

    point: SweepPoint
    mode: str = "pending"  # skip (already finished), new, resume (see marginlab.lab.runner.plan_mode)
    status: str = "pending"
    error: str | None = None
    traceback: str | None = None
    seconds: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepResult:
    """Every run of a sweep, in grid order; ``failed`` lists those that did not finish."""

    out: Path
    records: list[RunRecord]

    @property
    def failed(self) -> list[RunRecord]:
        """The runs that did not finish (failed, interrupted or never started), in grid order."""
        return [r for r in self.records if r.status != "finished"]


def default_run(raw: dict[str, Any], path: Path, mode: str) -> None:
    """Run one grid point with the experiment runner (it decides run / resume / skip itself)."""
    run_or_resume(raw, path)


def run_sweep(
    base: dict[str, Any],
    grid: Sequence[str] | dict[str, list[str]],
    out: str | Path,
    *,
    jobs: int = 1,
    keys: Sequence[str] | None = None,
    run_fn: RunFn | None = None,
    validate: bool = True,
    launcher: Launcher | None = None,
) -> SweepResult:
    """Run every grid point of ``base`` into ``out/<name>``, skipping finished ones; see the module doc.

    ``grid``: ``"key=v1,v2"`` strings or the output of :func:`parse_grid`. ``keys``: summary keys for the
    table (default: the scalar keys all finished runs share). ``run_fn``: replaces :func:`default_run`
    (it must be picklable when ``jobs > 1``). ``validate``: build every config before running anything,
    so a typo fails the sweep at once instead of failing every run. ``launcher``: where the runs execute
    (default: :class:`~marginlab.lab.launchers.LocalLauncher` with ``jobs``; ``make_launcher("slurm", ...)``
    of :mod:`marginlab.lab.slurm` submits them as one SLURM array job and waits for it).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be a positive integer, got {jobs!r}")
    grid = dict(grid) if isinstance(grid, dict) else parse_grid(grid)
    out = check_out_path(out)
    if is_run_dir(out):
        raise RunDirError(f"--out {out} is a run directory, not a sweep directory; choose another --out")
    records = [RunRecord(p) for p in plan_sweep(base, grid)]
    # Finished runs of the same config are skipped without importing the user's model code; every other
    # config is validated (a typo fails the sweep now, before anything is written or run).
    done = [validate and finished_with(r.point.config, out / r.point.name) for r in records]
    pairs = zip(records, done, strict=True)
    expected = [None if d else _expected_config(r.point, validate) for r, d in pairs]
    # One sweep at a time in a directory: a second one (or a `run --out` there) is refused as "in use"
    # before it writes anything, so its runs can never be recorded as failed for being in use. SLURM
    # sweeps share the lock: the same command again attaches to the jobs (launch.json), by design.
    launcher = launcher or LocalLauncher(jobs)
    made = not out.exists()
    lock = RunDir(out)
    lock.lock("sweep directory", shared=not getattr(launcher, "exclusive", True))
    try:
        return _run_locked(out, base, grid, records, done, expected, keys, run_fn, launcher, made)
    finally:
        lock.unlock()


def _run_locked(
    out: Path,
    base: dict[str, Any],
    grid: dict[str, list[str]],
    records: list[RunRecord],
    done: list[bool],
    expected: list[dict[str, Any] | None],
    keys: Sequence[str] | None,
    run_fn: RunFn | None,
    launcher: Launcher,
    made: bool,
) -> SweepResult:
    """:func:`run_sweep` once it holds the sweep directory's lock (``made``: it created ``out``)."""
    try:
        for rec, skip, config in zip(records, done, expected, strict=True):
            path = out / rec.point.name
            rec.mode = "skip" if skip or config is None else _plan_mode(path, config)
            if rec.mode == "skip":
                _finish(rec, path, Outcome(None))
    except BaseException:
        if made:  # nothing written yet: leave no directory holding only the lock behind
            with contextlib.suppress(OSError):
                (out / LOCK).unlink()
                out.rmdir()
        raise
    writer = _Writer(out, base, grid, records, keys)
    writer.write()
    todo = [r for r in records if r.mode != "skip"]
    jobs_list = [(r.point.config, out / r.point.name, r.mode) for r in todo]
    try:
        with (
            sigterm_stops_sweep(),
            closing(launcher.execute(jobs_list, run_fn or default_run, out)) as events,
        ):
            for i, outcome in events:
                if outcome is None:
                    todo[i].status = "running"
                else:
                    _finish(todo[i], out / todo[i].point.name, outcome)
                writer.write()  # the tables are current at every start and end, even if the sweep is killed
    except KeyboardInterrupt as e:  # the workers are dead by now (closing the events kills them)
        _interrupted(todo, stop_signal(e))
        raise
    finally:
        writer.write()
    return SweepResult(out, records)


def _plan_mode(path: Path, expected: dict[str, Any]) -> str:
    return plan_mode(path, expected)


def _expected_config(point: SweepPoint, validate: bool) -> dict[str, Any]:
    """The config.json the point's run directory should hold (the runner's resolved form)."""
    if not validate:
        return to_jsonable(point.config)
    try:
        return config_record(point.config)
    except ConfigError as e:
        raise ConfigError(f"sweep run {point.name}: {e}") from None


def _finish(rec: RunRecord, path: Path, outcome: Outcome) -> None:
    error = outcome.error
    if error is None:
        try:
            summary = read_summary_if_any(path)
        except (OSError, RunDirError):
            error = f"{path / SUMMARY} is corrupt"
        else:
            if summary is None:
                error = f"the run ended without writing {SUMMARY}"
            else:
                rec.summary = summary
    rec.status = "finished" if error is None else "interrupted" if outcome.interrupted else "failed"
    rec.error, rec.traceback, rec.seconds = error, outcome.traceback, outcome.seconds


def _interrupted(records: list[RunRecord], sig: signal.Signals) -> None:
    """The sweep was stopped by ``sig``: the runs it was running are interrupted (not failed)."""
    for rec in records:
        if rec.status == "running":
            rec.status = "interrupted"
            rec.error = f"the sweep was stopped by {sig.name} before this run ended"


@dataclass
class _Writer:
    """Writes the manifest and the two tables of a sweep (atomically, from the main process only)."""

    out: Path
    base: dict[str, Any]
    grid: dict[str, list[str]]
    records: list[RunRecord]
    keys: Sequence[str] | None

    def write(self) -> None:
        try:
            atomic_write_json(self.out / SWEEP_MANIFEST, self.manifest())
            header, rows = self.table()
            csv_rows = [[_csv_cell(c) for c in row] for row in rows]
            md_rows = [[format_cell(c) for c in row] for row in rows]
            atomic_write_text(self.out / SWEEP_CSV, csv_text(header, csv_rows))
            atomic_write_text(self.out / SWEEP_MD, markdown_table(header, md_rows))
        except OSError as e:
            raise RunDirError(f"cannot write the sweep files in {self.out}: {e.strerror or e}") from None

    def manifest(self) -> dict[str, Any]:
        runs = [
            {
                "name": r.point.name,
                "values": r.point.values,
                "overrides": list(r.point.overrides),
                "mode": r.mode,
                "status": r.status,
                "error": r.error,
                "seconds": r.seconds,
                "traceback": r.traceback,
                "config": r.point.config,
            }
            for r in self.records
        ]
        return {"base": self.base, "grid": self.grid, "runs": runs}

    def table(self) -> tuple[list[str], list[list[Any]]]:
        finished = [scalar_items(r.summary) for r in self.records if r.status == "finished"]
        keys = list(self.keys) if self.keys else [k for k in shared_keys(finished) if k != "kind"]
        keys = [k for k in keys if k not in self.grid]  # a summary echoing a grid value adds nothing
        # Summary keys named like the table's own columns get a prefix so every header is unique.
        columns = [f"summary.{k}" if k in ("run", "status", "error") else k for k in keys]
        header = ["run", *self.grid, "status", *columns, "error"]
        rows = []
        for r in self.records:
            flat = scalar_items(r.summary)
            values = [r.point.values[k] for k in self.grid]
            rows.append([r.point.name, *values, r.status, *[flat.get(k) for k in keys], r.error or ""])
        return header, rows


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return value
