"""The live dashboard in headless Debian Chromium: load it, send traffic, watch the numbers move."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from callstream.localkafka import free_port
from callstream.procs import Process
from callstream.simulate import SimulationPlan
from callstream.simulate import run as simulate

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Where the sentiment tile's parts are, against its own box and a number tile's.
FIT = """() => {
  const tile = document.querySelector('.tile[data-metric="sentiment"]');
  const box = tile.getBoundingClientRect();
  const outside = [...tile.querySelectorAll("*")].filter((e) => {
    const r = e.getBoundingClientRect();
    return r.left < box.left || r.right > box.right || r.top < box.top || r.bottom > box.bottom;
  });
  return {
    outside: outside.map((e) => e.outerHTML.slice(0, 80)),
    overflows: tile.scrollWidth > tile.clientWidth || tile.scrollHeight > tile.clientHeight,
    height: box.height,
    number_tile_height: document.querySelector('.tile[data-metric="calls"]').getBoundingClientRect().height,
    legend: [...tile.querySelectorAll(".legend .item")].map((e) => e.innerText),
  };
}"""


def tile(page: Page, name: str) -> str:
    return page.locator(f'.tile[data-metric="{name}"] .v').inner_text()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make test installs it)")
def test_dashboard_updates_live(
    topics: str, api_key: str, gateway_service: Process, start_service: Callable[..., Process], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = start_service("worker", "worker", "--web-port", str(port), url=url)
    worker.wait_http("/api/metrics", timeout=90, ok=lambda r: r.status_code == 200 and r.json()["complete"])
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 1100},
        )
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url + "/")
            page.wait_for_selector('.tile[data-metric="calls"]')
            assert tile(page, "calls") == "0"
            # Playwright's sync API runs an event loop in this thread; the sender gets its own.
            with ThreadPoolExecutor(1) as pool:
                res = pool.submit(
                    asyncio.run,
                    simulate(
                        f"{gateway_service.url}/webhook", api_key, SimulationPlan(calls=40, rate=300, seed=4, agents=2)
                    ),
                ).result()
            assert res.failed == 0
            want = str(len(res.calls))
            for name in ("calls", "ended"):
                page.wait_for_function(
                    '([m, n]) => document.querySelector(`.tile[data-metric="${m}"] .v`).innerText === n',
                    arg=[name, want],
                    timeout=60_000,
                )
            assert tile(page, "calls") == want and tile(page, "ended") == want
            page.wait_for_function(
                "n => document.querySelector('.tile[data-metric=\"analyzed\"] .v').innerText === n", arg=want
            )
            fit = page.evaluate(FIT)  # drawn with the same poll as the analyzed count: the final sentiments
            assert fit["outside"] == [] and not fit["overflows"]
            assert fit["height"] == fit["number_tile_height"]  # the tile keeps its row's height
            sentiment = httpx.get(f"{url}/api/metrics", timeout=10).json()["overall"]["sentiment"]
            assert sorted(fit["legend"]) == sorted(f"{k} {v}" for k, v in sentiment.items())
            page.wait_for_selector("#alerts tbody tr", timeout=30_000)  # failed dials and errors raise alerts
            assert page.locator("#agents tbody tr").count() == 2
            assert page.locator("canvas").count() >= 4  # the four uPlot charts drew
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert all(u.startswith(url) for u in requests), "the page must load nothing from elsewhere"
        finally:
            browser.close()


TOKEN = "dashboard-token-0123456789abcdef"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make test installs it)")
def test_login_sets_a_strict_http_only_cookie_that_opens_the_dashboard(
    topics: str, start_service: Callable[..., Process], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = start_service(
        "worker",
        "worker",
        "--web-port",
        str(port),
        url=url,
        env={"CALLSTREAM_DASHBOARD_TOKENS": f"other-token-xyz0123456789,{TOKEN}"},
    )
    worker.wait_http("/readyz", timeout=90, ok=lambda r: r.status_code == 200)
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=ARGS
        )
        try:
            page = browser.new_page()
            page.goto(url + "/")
            assert page.url == url + "/login"  # sent to the login page
            assert page.locator("#error").is_hidden()
            page.fill("#token", "not-the-token-0123456789")
            page.click("button[type=submit]")
            page.wait_for_selector("#error", state="visible")
            assert browser.cookies() == []
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector('.tile[data-metric="calls"]')
            assert page.url == url + "/"
            page.wait_for_function("() => document.getElementById('status').textContent.startsWith('updated')")
            (cookie,) = browser.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
            assert TOKEN not in cookie["value"]
            assert page.evaluate("document.cookie") == ""  # the page's scripts cannot read it
            # The page's own requests carry it; a request from elsewhere does not get in.
            assert page.evaluate("fetch('/api/counts').then((r) => r.status)") == 200
            assert httpx.get(f"{url}/api/counts", timeout=10).status_code == 401
            assert (
                httpx.get(f"{url}/api/counts", cookies={cookie["name"]: cookie["value"]}, timeout=10).status_code == 200
            )
            browser.clear_cookies()  # as when its token is rotated out: the page's next poll goes to the login
            page.wait_for_url(url + "/login")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector('.tile[data-metric="calls"]')
            page.goto(url + "/logout")
            assert page.url == url + "/login" and browser.cookies() == []
            page.goto(url + "/")
            assert page.url == url + "/login"
        finally:
            browser.close()
