"""Figures of a ``train`` run whose records hold ``null`` statistics (not finite: a failed attack's ±inf,
which JSON cannot hold) are drawn, and what they draw is exactly the finite values: gaps at the nulls,
never a line or band joined over them, and a note that says so. The records are written by hand here,
so the expected data do not come from the code under test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from marginlab.base.fsio import to_jsonable  # noqa: E402
from marginlab.cli import main  # noqa: E402
from marginlab.plots import training as training_plots  # noqa: E402
from marginlab.plots.training import NOT_FINITE_NOTE, draw_series, plot_training  # noqa: E402
from marginlab.training.records import margin_summary  # noqa: E402

N = None  # a statistic recorded as null
FO = {"kind": "estimate", "min": -0.5, "mean": 0.2, "median": 0.25, "q10": 0.0, "q25": 0.1, "q75": 0.3,
      "q90": 0.4, "max": 0.6, "neg_share": 0.1}  # fmt: skip


def _ddn(min_, mean, median, q10, q90) -> dict:
    return {"kind": "upper bound", "n": 10, "min": min_, "mean": mean, "median": median, "q10": q10,
            "q25": q10, "q75": q90, "q90": q90, "max": N, "neg_share": 0.1}  # fmt: skip


# The train split's DDN bound, by epoch (epochs 2 and 3 did not measure it): (min, mean, median, q10, q90).
# The median and q10 are null at the same epoch, q90 at more: the shape that made fill_between raise.
DDN_TRAIN = {
    0: (N, N, 0.5, 0.2, N),
    1: (0.1, N, 0.6, 0.3, 0.9),
    4: (0.15, 0.7, N, N, N),
    5: (0.2, 0.75, 0.8, 0.5, 1.1),
    6: (0.25, 0.8, 0.9, 0.55, 1.2),
}


def _records() -> list[dict]:
    out = []
    for epoch in range(7):
        rec: dict = {"epoch": epoch, "train_loss_epoch": 1.0 / (epoch + 1), "train_acc_epoch": 0.5}
        for split in ("train", "test"):
            margins = {"first-order": FO}
            if epoch in DDN_TRAIN:  # the test split's bound is never finite
                margins["ddn"] = _ddn(*DDN_TRAIN[epoch]) if split == "train" else _ddn(N, N, N, N, N)
            rec[split] = {"n": 20, "loss": 1.0, "acc": 0.5, "margins": margins}
        out.append(rec)
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A hand-written ``train`` run directory: config, records with nulls, margins with ±inf."""
    cfg = {"kind": "train", "data": {"dataset": "digits"}, "model": {"name": "mlp"}, "tracking": {"p": 2}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    (tmp_path / "margins").mkdir()
    train = np.array([0.1, 0.2, np.inf, 0.3, -np.inf, 0.4], dtype=np.float32)
    np.savez(tmp_path / "margins" / "epoch-0001.npz", **{"train/ddn": train, "test/ddn": np.full(3, np.inf)})
    return tmp_path


def test_a_failed_attack_is_written_as_null() -> None:
    """The premise: a summary with ±inf points holds ``null`` quantiles once written as JSON."""
    m = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, math.inf, math.inf], dtype=torch.float64)
    got = json.loads(json.dumps(to_jsonable(margin_summary("upper bound", m))))
    assert got["q90"] is None and got["mean"] is None and got["max"] is None
    assert got["q10"] == 0.2 and got["median"] == 0.4  # nearest order statistics, still finite


def test_plot_command_draws_a_run_with_nulls(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(run_dir)]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert written == {"margins.png", "histograms.png", "loss_accuracy.png"}


def _finite(xs, ys) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]


@pytest.mark.parametrize(("stat", "col"), [("min", 0), ("mean", 1), ("median", 2)])
def test_drawn_data_are_the_finite_values(stat, col) -> None:
    fig, ax = plt.subplots()
    try:
        draw_series(ax, _records(), "train", "ddn", stat, label="train")
        (line,) = ax.lines
        x, y = line.get_xdata(), np.asarray(line.get_ydata(), dtype=float)
        assert list(x) == list(DDN_TRAIN)  # every epoch that measured the bound, in order
        want = {e: v[col] for e, v in DDN_TRAIN.items()}
        assert _finite(x, y) == [(e, v) for e, v in want.items() if v is not None]
        assert [e for e, v in zip(x, y, strict=True) if math.isnan(v)] == [
            e for e, v in want.items() if v is None
        ]
        assert NOT_FINITE_NOTE in [t.get_text() for t in ax.texts]
    finally:
        plt.close(fig)


def test_band_spans_only_epochs_with_both_quantiles_finite() -> None:
    fig, ax = plt.subplots()
    try:
        draw_series(ax, _records(), "train", "ddn", "median")
        band, bars = ax.collections  # the fill and the bars of one-epoch stretches
        corners = {(float(x), float(y)) for path in band.get_paths() for x, y in path.vertices}
        # q10 and q90 are both finite at epochs 1, 5 and 6 only: a stretch 5-6 and epoch 1 alone
        assert corners == {(1.0, 0.3), (1.0, 0.9), (5.0, 0.5), (5.0, 1.1), (6.0, 0.55), (6.0, 1.2)}
        assert sorted(len({x for x, _ in path.vertices}) for path in band.get_paths()) == [1, 2]
        # epoch 1 (between epochs 0 and 4, whose q90 is null) has no width: a bar from q10 to q90 shows it
        assert [seg.tolist() for seg in bars.get_segments()] == [[[1.0, 0.3], [1.0, 0.9]]]
    finally:
        plt.close(fig)


def test_finite_series_are_drawn_as_before() -> None:
    """No null: one unbroken line and band over every epoch, and no note."""
    fig, ax = plt.subplots()
    try:
        drawn = draw_series(ax, _records(), "train", "first-order", "median")
        assert list(ax.lines[0].get_ydata()) == [0.25] * 7 and len(ax.collections) == 1
        (path,) = ax.collections[0].get_paths()
        assert {(float(x), float(y)) for x, y in path.vertices} == {
            (e, q) for e in range(7) for q in (0.0, 0.4)
        }
        assert drawn == (list(range(7)) * 3, [0.25] * 7 + [0.0] * 7 + [0.4] * 7) and not ax.texts
    finally:
        plt.close(fig)


def test_histograms_leave_out_infinite_margins_and_say_so(run_dir, monkeypatch) -> None:
    figures = []
    monkeypatch.setattr(training_plots, "save", lambda fig, path: figures.append(fig) or path)
    plot_training(run_dir)
    try:
        hist = next(f for f in figures if any("margin" in a.get_title() and a.patches for a in f.axes))
        train = next(a for a in hist.axes if a.get_title() == "train: ddn margin")
        (step,) = train.patches
        legend = [t.get_text() for t in train.get_legend().get_texts()]
        assert legend == ["epoch 1 (2 of 6 not finite, not drawn)"]
        xy = step.get_path().vertices  # a step outline: (edge, 0), (edge, count), (next edge, count)...
        lo, hi = 0.1 + 0.005 * 0.3, 0.4 - 0.005 * 0.3  # the 0.5% and 99.5% quantiles of the 4 finite values
        assert (
            np.isfinite(xy).all()
            and xy[:, 0].min() == pytest.approx(lo)
            and xy[:, 0].max() == pytest.approx(hi)
        )
        assert xy[1:-1:2, 1].sum() == 4  # one count per bin: the 4 finite margins
        test = next(a for a in hist.axes if a.get_title() == "test: ddn margin")
        assert [t.get_text() for t in test.texts] == ["no finite margins"] and not test.patches
    finally:
        for f in figures:
            plt.close(f)
