"""The live dashboard in headless Debian Chromium: load it, send traffic, watch the numbers move."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from callstream.localkafka import free_port
from callstream.simulate import run as simulate

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


def tile(page, name: str) -> str:
    return page.locator(f'.tile[data-metric="{name}"] .v').inner_text()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make test installs it)")
def test_dashboard_updates_live(topics, api_key, gateway_service, start_service, tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    worker = start_service("worker", "worker", "--web-port", str(port), url=f"http://127.0.0.1:{port}")
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
            page.goto(worker.url + "/")
            page.wait_for_selector('.tile[data-metric="calls"]')
            assert tile(page, "calls") == "0"
            # Playwright's sync API runs an event loop in this thread; the sender gets its own.
            with ThreadPoolExecutor(1) as pool:
                res = pool.submit(
                    asyncio.run,
                    simulate(f"{gateway_service.url}/webhook", api_key, calls=40, rate=300, seed=4, agents=2),
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
            page.wait_for_selector("#alerts tbody tr", timeout=30_000)  # failed dials and errors raise alerts
            assert page.locator("#agents tbody tr").count() == 2
            assert page.locator("canvas").count() >= 4  # the four uPlot charts drew
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert all(u.startswith(worker.url) for u in requests), "the page must load nothing from elsewhere"
        finally:
            browser.close()
