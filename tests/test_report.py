"""Reports: every figure embedded, every run present, escaping, Markdown, broken inputs.

The run directories are fakes written here (config.json, metrics.jsonl, summary.json, small PNGs), so
these tests do not depend on any experiment. The HTML is checked with the standard library's parser.
"""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from marginlab.cli import main as cli_main  # noqa: E402
from marginlab.errors import ConfigError, RunDirError  # noqa: E402
from marginlab.report import write_report  # noqa: E402
from marginlab.report.tables import flatten, format_cell, markdown_table, shared_keys  # noqa: E402

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
