"""Reports: every figure embedded, every run present, escaping, Markdown, broken inputs.

The run directories are fakes written here (config.json, metrics.jsonl, summary.json, small PNGs), so
these tests do not depend on any experiment. The HTML is checked with the standard library's parser.
"""

from __future__ import annotations

import base64
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from marginlab.base.errors import ConfigError, RunDirError  # noqa: E402
from marginlab.base.tables import flatten, format_cell, markdown_table, shared_keys, split_pivot  # noqa: E402
from marginlab.cli import main as cli_main  # noqa: E402
from marginlab.report import write_report  # noqa: E402

EVIL = "<script>alert('x')</script>"


def make_run(
    root: Path,
    name: str,
    *,
    summary: dict[str, Any] | None,
    figures: tuple[str, ...] = ("margins.png", "sub/curves.png"),
    config: dict[str, Any] | None = None,
    n_metrics: int = 10,
) -> Path:
    """A fake run directory; ``summary=None`` makes it unfinished."""
    run = root / name
    run.mkdir(parents=True)
    cfg = config or {"kind": "logreg-gd", "seed": 0, "train": {"lr": 0.01, "epochs": n_metrics}}
    (run / "config.json").write_text(json.dumps(cfg))
    lines = [
        json.dumps({"epoch": i, "loss": 1.0 / (i + 1), "margin": {"min": 0.1 * i}}) for i in range(n_metrics)
    ]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    for i, fig_name in enumerate(figures):
        path = run / "figures" / fig_name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = plt.figure(figsize=(1, 1), dpi=30)
        plt.plot([0, 1], [i, 1 - i])
        fig.savefig(path)
        plt.close(fig)
    return run


class Page(HTMLParser):
    """Collects images, resource-loading attributes, tags and visible text of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                (
                    self.images
                    if tag == "img" and value.startswith("data:image/png;base64,")
                    else self.external
                ).append(value)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def embedded_pngs(page: Page) -> list[bytes]:
    return [base64.b64decode(src.split(",", 1)[1], validate=True) for src in page.images]


def md_links(md_path: Path) -> list[Path]:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    return [md_path.parent / unquote(link) for link in links]


def test_single_run_report_embeds_every_figure(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run1", summary={"kind": "logreg-gd", "acc": 0.98, "margin": {"min": 0.5}})
    html_path, md_path = write_report([run])
    assert html_path == run / "report.html" and md_path == run / "report.md"  # default: the run itself
    page = parse(html_path)
    pngs = sorted(p.read_bytes() for p in (run / "figures").rglob("*.png"))
    assert len(pngs) == 2
    assert sorted(embedded_pngs(page)) == pngs  # each figure embedded byte for byte
    assert page.external == [] and "script" not in page.tags and "link" not in page.tags
    text = "".join(page.text)
    assert "margin.min" in text and "0.98" in text  # flattened summary
    assert "details" in page.tags  # the config is a collapsible block
    links = md_links(md_path)
    assert len(links) == 2 and all(p.is_file() for p in links)
    assert sorted(p.read_bytes() for p in links) == pngs
    assert "| acc | 0.98 |" in md_path.read_text()


def test_comparison_of_several_runs(tmp_path: Path) -> None:
    a = make_run(tmp_path / "sweep", "lr=0.01", summary={"acc": 0.9, "only_a": 1, "m": {"avg": 0.25}})
    b = make_run(
        tmp_path / "sweep",
        "lr=0.002",
        summary={"acc": 0.8, "m": {"avg": 0.5}},
        config={"kind": "logreg-gd", "seed": 0, "train": {"lr": 0.002, "epochs": 10}},
        figures=("one.png",),
    )
    c = make_run(tmp_path / "other", "unfinished-run", summary=None, figures=())
    (b / "table.csv").write_text("model,robust acc\nstandard,0.5\nregularized,0.75\n")
    out = tmp_path / "rep"
    html_path, md_path = write_report([a, b, c], out, title="My comparison")
    page = parse(html_path)
    text = "".join(page.text)
    n_png = sum(1 for r in (a, b, c) for _ in (r / "figures").rglob("*.png"))
    assert len(page.images) == n_png == 3
    for label in ("lr=0.01", "lr=0.002", "unfinished-run"):
        assert f"Run {label}" in text
    assert "UNFINISHED" in text and "unfinished: this run has no summary.json" in text
    assert "My comparison" in text and "Config differences" in text and "train.lr" in text
    # The comparison table holds the shared keys only: acc and m.avg, not only_a.
    comparison = text.split("Summary (shared keys)")[1].split("Config differences")[0]
    assert "m.avg" in comparison and "acc" in comparison and "only_a" not in comparison
    assert "regularized" in text and "robust acc" in text  # table.csv rendered
    md = md_path.read_text()
    assert "| regularized | 0.75 |" in md and "# My comparison" in md
    links = md_links(md_path)
    assert len(links) == 3 and all(p.is_file() and p.is_relative_to(out) for p in links)  # copied
    assert (a / "report.html").exists() is False  # nothing written into the runs themselves


def test_a_sweep_directory_stands_for_its_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        make_run(sweep, f"seed={seed}", summary={"acc": 0.5 + seed / 10}, figures=("f.png",))
    runs = [{"name": "seed=0"}, {"name": "seed=1"}, {"name": "seed=2"}]  # seed=2 not started yet
    (sweep / "sweep.json").write_text(json.dumps({"runs": runs}))
    html_path, _ = write_report([sweep])
    assert html_path == sweep / "report.html"  # default: next to the sweep's own tables
    text = "".join(parse(html_path).text)
    assert "Run seed=0" in text and "Run seed=1" in text and "seed=2" not in text


def test_table_md_is_included_verbatim(tmp_path: Path) -> None:
    run = make_run(tmp_path, "cmp", summary={"acc": 1.0}, figures=())
    (run / "table.md").write_text("| model | acc |\n|---|---|\n| std | 0.5 |\n")
    html_path, md_path = write_report([run], tmp_path / "out")
    assert "| std | 0.5 |" in "".join(parse(html_path).text)
    assert "| std | 0.5 |" in md_path.read_text()


def test_everything_from_files_is_escaped(tmp_path: Path) -> None:
    cfg = {"kind": EVIL, "note": "a | b `c` ```"}
    run = make_run(tmp_path, "evil<b>", summary={EVIL: EVIL, "x|y": "<img src=x>"}, config=cfg)
    html_path, md_path = write_report([run], tmp_path / "out", title=f"T {EVIL}")
    page = parse(html_path)
    assert "script" not in page.tags and page.tags.count("img") == 2 and "b" not in page.tags
    assert EVIL in "".join(page.text)  # shown as text, not run
    md = md_path.read_text()
    assert "````json" in md  # the fence is longer than the ``` inside the config
    outside_code = re.sub(r"````json\n.*?\n````", "", md, flags=re.S)  # code blocks show text literally
    assert "<script>" not in outside_code and "<img src=x>" not in outside_code and "<b>" not in outside_code
    assert "x\\|y" in md


def test_metrics_table_shows_first_and_last_records(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", summary={"acc": 1.0}, figures=(), n_metrics=50)
    _, md_path = write_report([run])
    md = md_path.read_text()
    assert "50 records in metrics.jsonl; showing 6" in md
    assert "| 0 | 0 | 1 |" in md and "| 49 | 4.9 | 0.02 |" in md  # epoch, margin.min (margins first), loss


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "is not a directory"),
        ("no-config", "no config.json"),
        ("corrupt-summary", "summary.json is corrupt"),
        ("corrupt-config", "config.json is corrupt"),
    ],
)
def test_broken_run_dirs_raise_one_line_errors(tmp_path: Path, breakage: str, message: str) -> None:
    run = make_run(tmp_path, "r", summary={"acc": 1.0}, figures=())
    if breakage == "missing":
        run = tmp_path / "nope"
    elif breakage == "no-config":
        (run / "config.json").unlink()
    else:
        (run / breakage.split("-")[1].join(["", ".json"])).write_text("{not json")
    with pytest.raises(RunDirError, match=message) as info:
        write_report([run], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_a_one_line_error(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", summary={"acc": 1.0})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="cannot write .*file/out"):
        write_report([run], blocker / "out")


def test_failed_write_removes_what_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import marginlab.report as report

    run = make_run(tmp_path, "r", summary={"acc": 1.0})
    real_write = report.atomic_write_text

    def failing_write(path: Path, text: str) -> None:
        if path.name == "report.html":
            raise OSError(28, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(report, "atomic_write_text", failing_write)
    with pytest.raises(RunDirError, match="No space left on device"):
        write_report([run], tmp_path / "out")  # figures copied and report.md written before the failure
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        write_report([])


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_run(tmp_path, "a", summary={"acc": 0.5}, figures=("f.png",))
    b = make_run(tmp_path, "b", summary={"acc": 0.7}, figures=("g.png",))
    out = tmp_path / "rep"
    assert cli_main(["report", str(a), str(b), "--out", str(out), "--title", "T"]) == 0
    assert len(parse(out / "report.html").images) == 2 and (out / "report.md").is_file()
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("marginlab: error:") and err.count("\n") == 1


def test_table_helpers() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}
    assert shared_keys([{"a": 1, "b": 2}, {"b": 3, "a": 4, "c": 5}]) == ["a", "b"]
    assert [format_cell(v) for v in (None, True, 0.123456, 3, [1, 2])] == [
        "–",
        "true",
        "0.1235",
        "3",
        "[1,2]",
    ]
    assert markdown_table(["k"], [["a|b<c>"]]).splitlines()[-1] == "| a\\|b\\<c\\> |"


# -- reading order: findings, headline figures, compact tables -------------------------------------------
def _deep_records(means: list[float], mins: list[float]) -> list[dict[str, Any]]:
    """Metrics records of a deep run (one estimator, both splits) with the given mean/min per epoch."""
    stats = [{"kind": "estimate", "min": lo, "mean": m} for lo, m in zip(mins, means, strict=True)]
    split = {"loss": 1.0, "acc": 0.5}
    return [
        {
            "epoch": e,
            "train": split | {"margins": {"first-order": s}},
            "test": split | {"margins": {"first-order": s}},
        }
        for e, s in enumerate(stats)
    ]


def _section(html_text: str, start: str, end: str) -> str:
    return html_text.split(start, 1)[1].split(end, 1)[0]


def test_report_opens_with_checked_findings(tmp_path: Path) -> None:
    from marginlab.training.trends import margin_trends

    # epoch 0 far below; then the min margin rises (-1 -> 0.5) and the mean rises too (0.2 -> 0.9)
    records = _deep_records(means=[-5.0, 0.2, 0.6, 0.9], mins=[-9.0, -1.0, 0.0, 0.5])
    trends = margin_trends(records, None, ["first-order"])
    summary = {"kind": "train", "margins": trends["margins"], "findings": trends["findings"]}
    run = make_run(tmp_path, "deep", summary=summary, config={"kind": "train"}, figures=("margins.png",))
    html_path, md_path = write_report([run])
    text = "".join(parse(html_path).text)
    findings = text.split("Findings", 1)[1].split("Headline figures", 1)[0]
    assert text.index("Findings") < text.index("Headline figures") < text.index("Runs")
    assert findings.count("✔ holds") == 2 and findings.count("✘ does not hold") == 2  # 2 claims x 2 splits
    assert "Train set, first-order margin (estimate): the minimum margin rises" in findings
    assert "-1 → 0.5, epochs 1 → 3" in findings and "0.2 → 0.9" in findings
    assert html_path.read_text().index('id="findings"') < html_path.read_text().index("<img")
    md = md_path.read_text()
    assert md.index("## Findings") < md.index("## Headline figures") < md.index("## Runs")
    assert "- ✘ **does not hold**: Test set, first-order margin (estimate): the mean margin falls" in md
    assert trends["findings"][0] in text  # the experiment's own sentences, in full, further down


def test_logreg_and_compare_verdicts(tmp_path: Path) -> None:
    from marginlab.experiments.compare_verdicts import _versus
    from marginlab.experiments.logreg_gd import trend_summary

    metrics = [
        {
            "epoch": e,
            **{
                split: {"margin": {"min": lo, "mean": m, "median": m}, "loss": 1 / e, "error": 0.1 / e}
                for split in ("train", "test")
            },
        }
        for e, lo, m in ((1, -0.5, 2.0), (10, 0.1, 1.5), (100, 0.3, 1.2))
    ]
    summary = {"first_epoch": 1, "last_epoch": 100, "svm_margin": 0.4, "svm_reg_margin": 0.35}
    summary |= {"cos_svm_reg_first": 0.5, "cos_svm_reg_last": 0.9, "shows_tradeoff": True}
    for split in ("train", "test"):
        summary |= trend_summary(metrics, split)
    lr = make_run(tmp_path, "lr", summary=summary, figures=())
    rng = np.random.default_rng(0)
    std_ok, reg_ok = rng.random(200) < 0.3, rng.random(200) < 0.6  # regularized: clearly more robust
    std = {"recipe": "standard", "clean_acc": 0.9, "test_mean_margin": 0.5, "eps": [1.0], "eps_ref": 1.0}
    reg = std | {"recipe": "regularized", "clean_acc": 0.88, "test_mean_margin": 0.4}
    std |= {"worst@1": float(std_ok.mean()), "_robust": [std_ok]}
    reg |= {"worst@1": float(reg_ok.mean()), "_robust": [reg_ok]}
    versus = json.loads(json.dumps(_versus(std, reg), default=bool))
    cmp = make_run(
        tmp_path, "cmp", summary={"bases": {"mlp": {"vs_standard": {"regularized": versus}}}},
        config={"kind": "compare"}, figures=(),
    )  # fmt: skip
    text = "".join(parse(write_report([lr, cmp], tmp_path / "out")[0]).text)
    findings = text.split("Findings", 1)[1].split("Runs", 1)[0]
    assert "✔ holds" + "Gradient descent shows the trade-off" in findings
    assert "Train set, exact L2 margin: the minimum margin rises toward the SVM's" in findings
    assert "-0.5 → 0.3 (SVM margin 0.4" in findings and "2 → 1.2, epochs 1 → 100" in findings
    assert "✘ does not holdmlp: regularized raises the test mean margin over standard" in findings
    assert "0.5 (standard) → 0.4" in findings
    assert (
        "✔ holdsmlp: regularized raises the worst-case robust accuracy at ε = 1 beyond the noise" in findings
    )


def test_headline_figures_come_first_in_a_fixed_order(tmp_path: Path) -> None:
    names = (
        "adversarial.png",
        "histograms.png",
        "robustness.png",
        "zeta.png",
        "b.bracket.png",
        "margins.png",
    )
    run = make_run(tmp_path, "r", summary={"acc": 1.0}, figures=tuple(n for n in names if "bracket" not in n))
    # `marginlab margins --estimator bracket --out r/b.csv` draws r/b.bracket.png beside the run's files
    (run / "b.bracket.png").write_bytes((run / "figures" / "zeta.png").read_bytes())
    html_path, md_path = write_report([run], tmp_path / "out")
    html_text = html_path.read_text()
    order = [
        "margins.png",
        "robustness.png",
        "b.bracket.png",
        "histograms.png",
        "adversarial.png",
        "zeta.png",
    ]
    captions = re.findall(r"<figcaption>r: ([^ <]+)", html_text)
    assert captions == order
    headline = _section(html_text, "<h2>Headline figures</h2>", "<h2>")
    assert re.findall(r"<figcaption>r: ([^ <]+)", headline) == order[:3]
    md_order = [Path(p).name for p in md_links(md_path)]
    assert md_order == order


def test_config_differences_show_only_the_keys_that_differ(tmp_path: Path) -> None:
    base = {"kind": "train", "seed": 0, "train": {"lr": 0.1, "epochs": 5, "batch_size": 32}, "data": {"n": 9}}
    a = make_run(tmp_path, "a", summary={"acc": 0.5}, config=base, figures=())
    other = json.loads(json.dumps(base))
    other["train"] |= {"lr": 0.2, "momentum": 0.9}
    b = make_run(tmp_path, "b", summary={"acc": 0.6}, config=other, figures=())
    html_text = write_report([a, b], tmp_path / "out")[0].read_text()
    table = _section(html_text, "<h3>Config differences</h3>", "</table>")
    assert re.findall(r"<tr><td>([^<]+)</td>", table) == ["train.lr"]
    assert MISSING_CELL not in table
    assert "only b has: train.momentum" in html_text


MISSING_CELL = "<td>–</td>"


def test_nothing_a_reader_needs_is_cut_and_tables_can_scroll(tmp_path: Path) -> None:
    sentence = "mlp: " + "the mean margin falls while the minimum margin rises; " * 6
    summary = {"findings": [sentence], "note": "x" * 200, "wide": {f"column{i}": i for i in range(40)}}
    run = make_run(tmp_path, "r", summary=summary, config={"kind": "unknown-kind"}, figures=())
    html_path, md_path = write_report([run])
    html_text, md = html_path.read_text(), md_path.read_text()
    assert sentence.strip() in html.unescape(html_text) and "x" * 200 in html_text and "…" not in html_text
    assert "as stated" in html_text  # a sentence without a structured verdict is shown as stated
    assert html_text.count("<table>") == html_text.count('<div class="scroll"><table>') > 0
    assert "x" * 200 in md


def test_split_pivot_puts_train_and_test_side_by_side() -> None:
    items = {"train_min_margin_last": 1, "test_min_margin_last": 2, "m.e.train.last": 3, "L": 4, "train": 5}
    items |= {"m.test.e.last": 6, "vs.b.x.a": 7}
    rest, rows = split_pivot(items)
    assert rest == {"L": 4, "train": 5, "vs.b.x.a": 7}  # a row only one split has keeps its own key
    assert rows == {"min_margin_last": {"train": 1, "test": 2}, "m.e.last": {"train": 3, "test": 6}}
    rest, rows = split_pivot(items, ["a", "b"])
    assert rows == {} and rest == items


# -- figures: labelled axes, y-ranges from the trained epochs, distinct train/test --------------------------
@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Figures drawn by the plot modules, by file name, kept open instead of saved."""
    import marginlab.plots.logreg as logreg
    import marginlab.plots.training as training

    figures: dict[str, Any] = {}

    def keep(fig: Any, path: Path) -> Path:
        figures[Path(path).name] = fig
        return Path(path)

    for module in (training, logreg):
        monkeypatch.setattr(module, "save", keep)
    yield figures
    plt.close("all")


def test_deep_margin_figure_labels_kinds_and_fits_the_trained_epochs(tmp_path: Path, captured: dict) -> None:
    from marginlab.plots.training import plot_training

    run = tmp_path / "deep"
    run.mkdir()
    cfg = {"kind": "train", "model": {"name": "mlp"}, "data": {"dataset": "digits"}, "tracking": {"p": 2.0}}
    (run / "config.json").write_text(json.dumps(cfg))
    records = _deep_records(means=[-40.0, 2.0, 1.6, 1.2], mins=[-50.0, -0.5, 0.0, 0.2])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_training(run)
    axes = captured["margins.png"].axes
    assert all(ax.get_xlabel() == "epoch" and ax.get_ylabel() == "signed L2 margin (estimate)" for ax in axes)
    mean_ax = axes[1]
    lo, hi = mean_ax.get_ylim()
    assert -40 < lo < 1.2 and 2.0 < hi < 3  # the fall 2.0 -> 1.2 fills the panel; epoch 0 lies off it
    train, test = mean_ax.get_lines()[:2]
    assert train.get_color() != test.get_color() and train.get_linestyle() != test.get_linestyle()


def test_logreg_figures_say_the_margins_are_exact(tmp_path: Path, captured: dict) -> None:
    from marginlab.plots.logreg import plot_logreg

    run = tmp_path / "lr"
    run.mkdir()
    recs = [
        {"epoch": e, "cos_svm": 0.5, "cos_svm_reg": 0.6}
        | {
            s: {"loss": 1 / e, "error": 0.0, "margin": {"min": e / 10, "mean": 2 - e / 10, "median": 1}}
            for s in ("train", "test")
        }
        for e in (1, 2, 5, 10)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    plot_logreg(run)
    for ax in captured["margins.png"].axes:
        assert ax.get_ylabel() == "signed L2 margin (exact)" and ax.get_xlabel()
    assert all(ax.get_xlabel() and ax.get_ylabel() for name in captured for ax in captured[name].axes)


def test_robustness_curve_axis_names_the_kind() -> None:
    from marginlab.plots.robustness import plot_robustness

    upper = plot_robustness(np.array([0.1, 0.5, 1.0]))
    exact = plot_robustness({"exact": np.array([0.1, 0.5, 1.0])})
    assert upper.axes[0].get_ylabel() == "robust accuracy (upper bound)"
    assert exact.axes[0].get_ylabel() == "robust accuracy (exact)"
    assert "norm of the perturbation" in upper.axes[0].get_xlabel()
