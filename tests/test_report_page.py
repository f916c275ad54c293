"""report.html, for a run of every task: written at the end of training and by `finetune report`, self-contained
(nothing to load), with the sections the run's files call for; and rendered by a real headless Chromium with no
console error, no request leaving the page, every chart and table drawn, and a screenshot saved.

The browser tests need Debian's Chromium (`apt-get install chromium`; `.ci/run` installs it) and the
`playwright` package (a test dependency) to drive it; only a missing Chromium skips them."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from finetune.cli import main
from tiny_runs import train_task_run

TASKS = ("classification", "question-answering", "generation", "translation")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What works here (closed network, root): no sandbox, no GPU, nothing in the background that phones home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Tables each task's page must hold, besides the results table and the environment's.
TABLES = {
    "classification": ["per-class-table", "confusion-matrix", "worst-table"],
    "question-answering": ["worst-table"],
    "generation": ["worst-table"],
    "translation": ["worst-table"],
}
WORST_COLUMNS = {
    "classification": ["text", "label", "prediction", "score"],
    "question-answering": ["question", "prediction", "answers", "f1", "context, prediction in [ ]"],
    "generation": ["prompt", "reference", "generation", "rougeL"],
    "translation": ["source", "reference", "hypothesis", "chrf"],
}


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task-runs")
    return {task: train_task_run(task, root / task) for task in TASKS}


# --- the page itself --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_training_writes_a_self_contained_report_page(task_runs: dict[str, Path], task: str) -> None:
    run = task_runs[task]
    page = (run / "report.html").read_text(encoding="utf-8")
    # Nothing that loads: no script, stylesheet link, image source, CSS url() or import; the only address is
    # the SVG namespace (a name, never fetched).
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|\bhref=|url\(|@import", page, flags=re.I)
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    for table in ["results-table", *TABLES[task], "data-table", "training-table", "environment-table"]:
        assert f'id="{table}"' in page, table
    assert page.count('<svg class="chart"') >= 2  # a metric's bars and the loss curve at least
    assert "<polyline" in page  # the curve has a line
    header = re.search(r'<table id="worst-table"><tr>(.*?)</tr>', page).group(1)
    columns = re.findall(r"<th>(.*?)</th>", header)
    for column in WORST_COLUMNS[task]:
        assert column in columns, (column, columns)
    metrics = json.loads((run / "metrics.json").read_text())
    headline = metrics["headline_metric"]
    assert f"test {headline} {metrics['test'][headline]:.4f}" in page
    card = (run / "README.md").read_text(encoding="utf-8")
    assert "[report.html](report.html)" in card  # the model card links to the page


def test_the_confusion_matrix_counts_the_predictions(task_runs: dict[str, Path]) -> None:
    run = task_runs["classification"]
    rows = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    page = (run / "report.html").read_text(encoding="utf-8")
    matrix = re.search(r'<table id="confusion-matrix".*?</table>', page).group(0)
    cells = [int(n) for n in re.findall(r'title="[^"]*">(\d+)</td>', matrix)]
    assert sum(cells) == len(rows)
    correct = sum(row["label"] == row["prediction"] for row in rows)
    diagonal = re.findall(r'title="(\w+) predicted as (\w+): (\d+)"', matrix)
    assert sum(int(n) for true, predicted, n in diagonal if true == predicted) == correct


def test_finetune_report_rewrites_the_page(task_runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    run = task_runs["translation"]
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert f"report written to {run / 'report.html'}" in capsys.readouterr().out
    assert 'id="worst-table"' in (run / "report.html").read_text(encoding="utf-8")
    assert main(["report", str(run.parent / "missing")]) == 2


# --- in a real browser --------------------------------------------------------------------------------------
class Browser:
    """Headless Chromium through playwright: each page is opened with every request recorded (and any request
    other than the page's own file aborted), console errors and page errors collected."""

    def __init__(self, playwright, profile: str):
        self.context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": 1200, "height": 900})
        self.context.route("**/*", self._route)
        self.allowed = ""
        self.blocked: list[str] = []

    def _route(self, route) -> None:
        if route.request.url == self.allowed:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def open(self, path: Path):
        """(page, requests, errors) of ``path`` once loaded."""
        self.allowed = path.resolve().as_uri()
        page = self.context.new_page()
        requests: list[str] = []
        errors: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(self.allowed, wait_until="load")
        page.wait_for_timeout(200)  # late console messages
        return page, requests, errors


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: apt-get install chromium (.ci/run installs it for CI)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        driver = Browser(playwright, profile)
        yield driver
        driver.context.close()


def test_the_browser_check_sees_requests_and_console_errors(browser: Browser, tmp_path: Path) -> None:
    """The checks below can fail: a page that fetches an image and logs an error is caught on both counts."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://example.invalid/x.png">'
                   '<script>console.error("broken")</script></body></html>', encoding="utf-8")
    _page, requests, errors = browser.open(bad)
    assert "http://example.invalid/x.png" in requests and "http://example.invalid/x.png" in browser.blocked
    assert any("broken" in e for e in errors)


@pytest.mark.parametrize("task", TASKS)
def test_the_report_page_renders_in_headless_chromium(browser: Browser, task_runs: dict[str, Path], task: str,
                                                      tmp_path: Path) -> None:
    report = task_runs[task] / "report.html"
    browser.blocked.clear()
    page, requests, errors = browser.open(report)
    assert errors == []
    assert requests == [report.resolve().as_uri()] and browser.blocked == []  # nothing left the page
    charts = page.locator("svg.chart")
    assert charts.count() >= 2
    for i in range(charts.count()):
        chart = charts.nth(i)
        box = chart.bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100, chart.inner_html()[:200]
        assert chart.locator("polyline, circle, rect.bar").count() > 0  # something drawn in it
    images = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert all(images)  # (the page draws with SVG; should an image appear, it must load)
    for table in ["results-table", *TABLES[task], "environment-table"]:
        rows = page.locator(f"#{table} tr")
        assert rows.count() >= 2 and page.locator(f"#{table}").is_visible(), table
    assert page.title().endswith(f"{task} report")
    shot = tmp_path / f"report-{task}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FINETUNE_SCREENSHOTS"):  # keep them, e.g. to look at or for the docs
        target = Path(os.environ["FINETUNE_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)
    page.close()
