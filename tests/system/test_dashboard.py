"""The live dashboard in a real headless Chromium (Debian's chromium + chromium-driver).

A missing browser is a failure, not a skip: `.ci/run` installs it. Screenshots
go to ``$SQM_ARTIFACTS`` (else ``test-artifacts/``) for a person to look at.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sqm.web
from sender import Sender
from tests.conftest import REPO, wait_for
from tests.system.test_prometheus import fake_status, serve_with_metrics

pytestmark = pytest.mark.timeout(90)

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1300,1000",
]

# Per worker row: [id, pid, host, state, idle, tasks, busy, memory, nice] as shown.
ROWS_JS = """
const sec = document.querySelector('section.queue[data-queue="' + arguments[0] + '"]');
if (!sec) return null;
return [...sec.querySelectorAll('tbody tr.worker')].map(
  (tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent));
"""
TILES_JS = """
const sec = document.querySelector('section.queue[data-queue="' + arguments[0] + '"]');
if (!sec) return {};
return Object.fromEntries([...sec.querySelectorAll('.tile')].map(
  (t) => [t.querySelector('span').textContent, t.querySelector('b').textContent]));
"""
# How many pixels of a canvas are drawn in roughly the given colour.
PIXELS_JS = """
const c = document.querySelector('section.queue[data-queue="' + arguments[0] + '"] canvas.' + arguments[1]);
const [r0, g0, b0] = arguments[2];
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) {
  if (d[i + 3] > 200 && Math.abs(d[i] - r0) < 40 && Math.abs(d[i + 1] - g0) < 40
      && Math.abs(d[i + 2] - b0) < 40) n++;
}
return n;
"""
PENDING_BLUE = (0x3B, 0x6F, 0xD8)
DONE_GREEN = (0x2E, 0x9D, 0x5B)


@pytest.fixture
def browser() -> Iterator[Any]:
    """A fresh headless Chromium driven by selenium; FAILS (never skips) without one."""
    chromium = os.environ.get("SQM_CHROMIUM", "/usr/bin/chromium")
    driver_path = os.environ.get("SQM_CHROMEDRIVER", "/usr/bin/chromedriver")
    missing = [p for p in (chromium, driver_path) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"the dashboard test needs a headless browser, missing: {', '.join(missing)}; "
            "install it with: apt-get install -y --no-install-recommends chromium chromium-driver "
            "(.ci/run does this)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.fail(f"selenium is not installed ({exc}): pip install -e '.[test]'", pytrace=False)
    profile = tempfile.mkdtemp(prefix="sqm-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        import shutil

        shutil.rmtree(profile, ignore_errors=True)


def until(driver: Any, cond: Any, timeout: float, what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def screenshot(driver: Any, name: str) -> Path:
    """Save a PNG artifact and check it is a real, non-trivial picture."""
    out = Path(os.environ.get("SQM_ARTIFACTS") or REPO / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    path.unlink(missing_ok=True)
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{path}: {len(data)} bytes"
    return path


def test_dashboard_shows_three_real_workers_and_their_work(cluster, browser):
    port = serve_with_metrics(cluster, "q")
    workers = [cluster.worker("q") for _ in range(3)]
    n = 30
    with Sender("q") as s:
        ids = [s.submit("add", {"a": i, "b": 1}) for i in range(n)]
        assert [s.receive(id=mid, timeout=10) for mid in ids] == [i + 1 for i in range(n)]

    browser.get(f"http://127.0.0.1:{port}/")
    assert browser.title == "sqm dashboard"

    def three_rows_with_memory(d: Any) -> list[list[str]] | None:
        rows = d.execute_script(ROWS_JS, "q")
        return rows if rows and len(rows) == 3 and all(r[7] != "–" for r in rows) else None

    rows = until(browser, three_rows_with_memory, 20, "3 worker rows with their memory")
    assert {r[1] for r in rows} == {str(w.pid) for w in workers}
    assert {r[2] for r in rows} == {socket.gethostname()}
    assert all(r[3] in ("idle", "busy") for r in rows)
    assert sum(int(r[5]) for r in rows) == n  # tasks done, across the three
    assert all(r[7].endswith(("KiB", "MiB", "GiB")) for r in rows)

    tiles = until(browser, lambda d: (t := d.execute_script(TILES_JS, "q")).get("completed") == str(n)
                  and t, 10, f"the completed tile to read {n}")
    assert tiles["workers"].startswith("3 /") and tiles["failed"] == "0"
    # the throughput chart has drawn its completed line
    until(browser, lambda d: d.execute_script(PIXELS_JS, "q", "rate", DONE_GREEN) > 50, 10,
          "the throughput chart's line")
    screenshot(browser, "dashboard-real-workers")


def test_dashboard_history_at_once_live_updates_and_escaping(browser):
    snap: dict[str, dict[str, Any]] = {"q": fake_status("q", workers=3)}
    pending = iter(range(10**6))

    def snapshot() -> dict[str, dict[str, Any]]:
        snap["q"]["pending"] = next(pending) % 20  # a moving line for the depth chart
        return snap

    with sqm.web.start("127.0.0.1", 0, snapshot, sample_every=0.05, history_s=30) as server:
        wait_for(lambda: len(server.history.since(0)) >= 40, 10, "40 history samples")
        browser.get(server.url)
        until(browser, lambda d: d.execute_script("return window.sqmDashboard.polls") >= 1, 10,
              "the first poll")
        # the first poll already brought the server's history: the chart is not empty
        assert browser.execute_script("return window.sqmDashboard.series.q.length") >= 40
        assert browser.execute_script(PIXELS_JS, "q", "depth", PENDING_BLUE) > 50

        # hostile text from a worker is shown as text, never run
        snap["q"]["workers"][0]["id"] = '<img src=x onerror="window.pwned=1">'
        snap["q"]["workers"][1]["host"] = "<b>bold</b>"
        del snap["q"]["workers"][2]
        rows = until(browser, lambda d: len(r := d.execute_script(ROWS_JS, "q")) == 2 and r, 10,
                     "the table to drop to 2 rows")
        assert '<img src=x onerror="window.pwned=1">' in {r[0] for r in rows}
        assert "<b>bold</b>" in {r[2] for r in rows}
        assert browser.execute_script("return window.pwned") is None
        assert browser.execute_script("return document.querySelectorAll('td img, td b').length") == 0

        # a second queue appears as its own section
        snap["other"] = fake_status("other", workers=1)
        until(browser, lambda d: len(d.execute_script(ROWS_JS, "other") or []) == 1, 10,
              "the second queue's section")
        screenshot(browser, "dashboard-fake")

    # the server is gone: the page says so instead of showing stale figures as live
    until(browser, lambda d: d.find_element("id", "conn").text == "offline", 10,
          "the page to notice the server is gone")
