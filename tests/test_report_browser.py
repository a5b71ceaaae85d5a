"""The report in a real browser: headless Chromium loads ``report.html`` of two tiny real runs (a
``logreg-gd`` run and a deep ``train`` run), and a script injected into a copy of the page checks what a
reader sees: no script errors, every figure decodes, no table runs off the page, the findings open the
first screen. A screenshot of the first screen is saved next to the copy.

Chromium runs offline (``--dump-dom`` after a virtual-time budget; the injected script writes its results
into the DOM, so no DevTools client is needed). Skipped where no ``chromium`` is installed
(``scripts/setup.sh`` installs Debian's package when it runs as root).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_train_toml, write_text
from marginlab.experiments import run_experiment
from marginlab.report import write_report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh as root)")

WIDTH, HEIGHT = 1280, 900  # the first screen of a laptop
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    f"--window-size={WIDTH},{HEIGHT}",
)

LOGREG = """kind = "logreg-gd"
epochs = 30
n_snapshots = 2
[data]
dataset = "digits:0,1"
"""

# Runs before anything else on the page (first in <head>): records script errors and console.error
# calls, then, once the page and its images have loaded (or failed to), measures the page and writes the
# results as JSON into <pre id="browser-checks">.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.type)), true);
const __consoleError = console.error;
console.error = (...a) => { window.__errors.push(a.map(String).join(" ")); __consoleError(...a); };
function __scroller(el) {
  for (let p = el.parentElement; p; p = p.parentElement) {
    const o = getComputedStyle(p).overflowX;
    if (o === "auto" || o === "scroll") return p;
  }
  return null;
}
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);  // "load" waits for every image: each is loaded or broken
  const vw = document.documentElement.clientWidth;
  const tables = Array.from(document.querySelectorAll("table")).map(t => {
    const s = __scroller(t), r = t.getBoundingClientRect();
    const box = s ? s.getBoundingClientRect() : {left: 0, right: vw, width: vw};
    return {width: r.width, box: box.width, boxRight: box.right, scrolls: !!s};
  });
  const f = document.getElementById("findings");
  const out = {
    errors: window.__errors,
    images: imgs.map(i => ({w: i.naturalWidth, h: i.naturalHeight, complete: i.complete, shown: i.width})),
    tables: tables,
    viewport: vw,
    pageWidth: document.documentElement.scrollWidth,
    findingsTop: f ? f.getBoundingClientRect().top : null,
    firstClaimBottom: (() => { const c = document.querySelector("ul.claims li");
                               return c ? c.getBoundingClientRect().bottom : null; })(),
  };
  const pre = document.createElement("pre");
  pre.id = "browser-checks";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile each launch
    profile.mkdir()
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of a tiny logreg-gd run and a tiny deep run, with their real figures."""
    from marginlab.base.config import load_config

    root = tmp_path_factory.mktemp("browser")
    runs = []
    for name, text in (("logreg", LOGREG), ("mlp", tiny_train_toml(epochs=3))):
        raw = load_config(write_text(root / f"{name}.toml", text), [])
        runs.append(run_experiment(raw, root / name))
    html_path, _ = write_report(runs, root / "report", title="browser check")
    return html_path


def _checks(report: Path, tmp: Path) -> dict[str, Any]:
    probed = tmp / "probed.html"
    probed.write_text(report.read_text().replace("<head>", "<head>\n" + PROBE, 1))
    done = _chromium(tmp, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    match = re.search(r'<pre id="browser-checks">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page never finished loading (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_report_reads_well_in_a_real_browser(report: Path, tmp_path: Path) -> None:
    checks = _checks(report, tmp_path)
    assert checks["errors"] == []
    figures = sorted(
        p for run in ("logreg", "mlp") for p in (report.parent.parent / run / "figures").glob("*.png")
    )
    assert len(checks["images"]) == len(figures) >= 6  # every figure of both runs is on the page
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 and i["shown"] > 0 for i in checks["images"])
    vw = checks["viewport"]
    assert checks["pageWidth"] <= vw  # nothing makes the page scroll sideways
    for t in checks["tables"]:
        # a table fits the page, or scrolls inside a container that does
        assert t["width"] <= vw or (t["scrolls"] and t["box"] <= vw and t["boxRight"] <= vw), t
    assert checks["findingsTop"] is not None and checks["findingsTop"] < 300  # the report opens with them
    assert checks["firstClaimBottom"] is not None and checks["firstClaimBottom"] < HEIGHT  # on screen one


def test_first_screen_screenshot(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "first-screen.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", report.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert (width, height) == (WIDTH, HEIGHT)
