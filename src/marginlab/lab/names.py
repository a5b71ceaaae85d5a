"""Every file and folder name of a run directory: the constants below are their only spelling.

Layout of a run directory::

    config.json        the full config with every default resolved (with ``kind``), written first
    provenance.json    what ran: versions, git commit, command line, device, threads (one entry a session)
    metrics.jsonl      one JSON record per evaluation step, appended as training goes
    checkpoint.pt      latest checkpoint (experiments that support resume)
    summary.json       written last: its presence marks the run as finished
    figures/           drawn from the files above only (``marginlab plot`` redraws them)
    margins/           per-point margins at chosen epochs, ``epoch-XXXX.npz``
    tensorboard/       TensorBoard event files (``train.tensorboard = true``)
    model.pt           final weights of a trained model (a plain ``state_dict``)
    robustness.json    robustness of the final model (comparison sub-runs, ``marginlab robustness``)
    svm.npz, adv_images.npz   the logistic-regression experiment's SVMs and fixed test images
    runs/<base>/<recipe>-seed<k>/   sub-runs of a comparison, each a run directory of its own
    table.csv, table.md        the tables of a comparison
    sweep.json, sweep.csv, sweep.md   a sweep's manifest and tables (also the comparison's tidy sweep.csv)
    launch.json, slurm/   a sweep or comparison run on SLURM: job ids and states; submitit's logs
    report.html, report.md, report-figures/   ``marginlab report`` (into the run directory by default)

``marginlab margins --out DIR`` writes ``margins.csv`` (or ``.parquet``), ``summary.json``, with
``--save-arrays`` the estimators' per-point arrays ``arrays.npz`` and, with ``bracket``, ``bracket.png``
into ``DIR``; ``marginlab robustness --out DIR`` writes ``robustness.json``
and ``robustness.png``. Readers of these files are in :mod:`marginlab.lab.readers`; where these commands
may write (never into a run directory itself, never over another's files) is :mod:`marginlab.lab.outputs`.
A run or sweep directory's ``.lock`` is held by the one process writing it
(:meth:`marginlab.lab.runs.RunDir.lock`).
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.json"
PROVENANCE = "provenance.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
FIGURES = "figures"
MARGINS = "margins"
TENSORBOARD = "tensorboard"
WEIGHTS = "model.pt"
ROBUSTNESS = "robustness.json"
SVM = "svm.npz"
ADV_IMAGES = "adv_images.npz"
SUBRUNS = "runs"
TABLE_CSV, TABLE_MD = "table.csv", "table.md"
SWEEP_MANIFEST, SWEEP_CSV, SWEEP_MD = "sweep.json", "sweep.csv", "sweep.md"
REPORT_HTML, REPORT_MD, REPORT_FIGURES = "report.html", "report.md", "report-figures"
# A sweep or comparison launched on SLURM: its job ids, log paths and states (``marginlab status``), the
# lock that keeps two submitters from submitting the same run, and submitit's folder (scripts, pickles, logs)
LAUNCH_STATE, LAUNCH_LOCK, SLURM_FOLDER = "launch.json", ".launch.lock", "slurm"
# what `marginlab margins --out DIR` writes into DIR: the per-point table (.csv/.parquet) and its summary
MARGINS_TABLE, MARGINS_SUMMARY = "margins", "summary.json"
# ... and, only with --save-arrays, the estimators' large per-point arrays (keys "<estimator>.<array>")
MARGINS_ARRAYS = "arrays.npz"

# Results tables of experiments that compare several models; the CSV is preferred when both exist.
RESULT_TABLES = (TABLE_CSV, TABLE_MD)

# Figures (PNG), under figures/ or, for the commands that evaluate a model, directly in --out.
FIGURE_SUFFIX = ".png"
MARGINS_FIGURE = "margins.png"  # margins over epochs (deep and logreg-gd runs)
HISTOGRAMS_FIGURE = "histograms.png"  # per-point margin histograms
LOSS_ACCURACY_FIGURE = "loss_accuracy.png"  # deep runs
LOSS_ERROR_FIGURE = "loss_error.png"  # logreg-gd
COSINE_FIGURE = "cosine.png"  # logreg-gd: direction of GD vs the SVMs
ADVERSARIAL_FIGURE = "adversarial.png"  # logreg-gd: minimal adversarial examples
MARGIN_CURVES_FIGURE = "margin_curves.png"  # comparisons
ROBUSTNESS_FIGURE = "robustness.png"  # comparisons and `marginlab robustness`
PARETO_FIGURE = "pareto.png"  # comparisons: robust vs clean accuracy per recipe, marker size = cost
POINT_MARGINS_FIGURE = "point_margin_histograms.png"  # comparisons: fixed test points' margin bounds
ROBUSTNESS_BAND_FIGURE = "robustness_band.png"  # comparisons: robust accuracy vs ε, certified band
BRACKET_FIGURE = "bracket.png"  # `marginlab margins --estimators bracket`

# Per-point margins at one epoch: margins/epoch-XXXX.npz
_EPOCH_PREFIX, _EPOCH_SUFFIX = "epoch-", ".npz"
EPOCH_GLOB = f"{_EPOCH_PREFIX}*{_EPOCH_SUFFIX}"

# Files whose presence anywhere in a run directory means finished work that must never be deleted (or,
# for launch.json, SLURM jobs that may still be writing into it).
WORK_FILES = (SUMMARY, CHECKPOINT, WEIGHTS, ROBUSTNESS, LAUNCH_STATE)


def margins_file(run_dir: str | Path, epoch: int) -> Path:
    """Where the per-point margins of ``epoch`` are kept: ``margins/epoch-XXXX.npz``."""
    return Path(run_dir) / MARGINS / f"{_EPOCH_PREFIX}{epoch:04d}{_EPOCH_SUFFIX}"


def epoch_of(path: Path) -> int | None:
    """The epoch of a per-point margins file (``epoch-0012.npz`` -> 12), None for any other name."""
    if not (path.name.startswith(_EPOCH_PREFIX) and path.name.endswith(_EPOCH_SUFFIX)):
        return None
    tail = path.stem.split("-", 1)[1]
    return int(tail) if tail.isdigit() else None


def subrun_dir(run_dir: str | Path, base: str, recipe: str, seed: int) -> Path:
    """The sub-run of a comparison for one base, recipe and seed."""
    return Path(run_dir) / SUBRUNS / base / f"{recipe}-seed{seed}"
