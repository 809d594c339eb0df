"""The worker's read side as a client sees it: where it listens, and the tokens in front of every
route but the probes, with two real worker processes that merge each other's partitions."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from callstream.localkafka import free_port
from callstream.procs import Process, callstream

OLD, NEW = "old-token-0123456789abcdef", "new-token-fedcba9876543210"


def outside_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def worker_without_kafka(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[Process, int]:
    """A worker whose Kafka is a closed port: its web server answers while it waits."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    base.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",
        CALLSTREAM_DATA_DIR=str(tmp_path / "faust"),
        PYTHONUNBUFFERED="1",
        **(env or {}),
    )
    proc = callstream(
        "worker",
        ["worker", "--web-port", str(port), *args],
        tmp_path / "worker.log",
        base,
        cwd=tmp_path,
        url=f"http://127.0.0.1:{port}",
    )
    return proc, port


@pytest.mark.slow
def test_by_default_the_worker_listens_on_loopback_only(tmp_path: Path) -> None:
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address besides loopback")
    proc, port = worker_without_kafka(tmp_path)
    try:
        proc.wait_http("/healthz", ok=lambda r: r.status_code == 200)
        assert not reachable(outside, port), f"the worker answers on {outside}:{port}"
    finally:
        proc.stop()


@pytest.mark.slow
def test_public_on_purpose_listens_everywhere(tmp_path: Path) -> None:
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address besides loopback")
    proc, port = worker_without_kafka(tmp_path, "--web-host", "0.0.0.0", env={"CALLSTREAM_DASHBOARD_PUBLIC": "true"})
    try:
        proc.wait_http("/healthz", ok=lambda r: r.status_code == 200)
        assert httpx.get(f"http://{outside}:{port}/api/alerts", timeout=5).status_code == 200
    finally:
        proc.stop()


def test_worker_refuses_to_serve_everyone_without_tokens(tmp_path: Path) -> None:
    proc, _ = worker_without_kafka(tmp_path, "--web-host", "0.0.0.0")
    code = proc.proc.wait(timeout=120)
    out = proc.output()
    assert code == 1 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("Error: the worker would serve its dashboard") and "CALLSTREAM_DASHBOARD_TOKENS" in last


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def poll(
    url: str, headers: dict[str, str], ok: Callable[[httpx.Response], bool], timeout: float = 120
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, headers=headers, timeout=5)
            if ok(r):
                return r
            last = f"HTTP {r.status_code} {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{url}: not as wanted in {timeout:.0f}s; last: {last}")


GUARDED = [
    "/",
    "/dashboard",
    "/static/dashboard.js",
    "/api/metrics",
    "/api/local",
    "/api/alerts",
    "/api/counts",
    "/metrics",
    "/router/",  # Faust's own pages are behind the same check
]


@pytest.mark.kafka
@pytest.mark.slow
def test_tokens_guard_every_route_but_the_probes_and_peers_use_them(
    topics: str, start_service: Callable[..., Process], tmp_path: Path
) -> None:
    workers = {}
    # A rotation under way: `a` has the new token first, `b` only the old one.
    for name, tokens in (("a", f"{NEW},{OLD}"), ("b", OLD)):
        port = free_port()
        workers[name] = start_service(
            f"worker-{name}",
            "worker",
            "--web-port",
            str(port),
            url=f"http://127.0.0.1:{port}",
            env={"CALLSTREAM_DASHBOARD_TOKENS": tokens, "CALLSTREAM_DATA_DIR": str(tmp_path / f"faust-{name}")},
        )
    a, b = workers["a"], workers["b"]
    for w, token in ((a, NEW), (b, OLD)):
        w.wait_http("/readyz", timeout=120, ok=lambda r: r.status_code == 200)  # the probes need no token
        # Each merges the other's partitions: its peer calls carry a token the other accepts.
        poll(
            f"{w.url}/api/metrics",
            bearer(token),
            lambda r: r.status_code == 200 and r.json()["complete"] and len(r.json()["workers"]) == 2,
        )
    with httpx.Client(timeout=10) as c:
        assert c.get(f"{a.url}/healthz").status_code == 200
        assert c.get(f"{a.url}/login").status_code == 200
        for path in GUARDED:
            for headers in ({}, bearer("wrong-token-0123456789"), {"Authorization": f"Basic {NEW}"}):
                r = c.get(f"{a.url}{path}", headers=headers)
                if path in ("/", "/dashboard"):
                    assert (r.status_code, r.headers["location"]) == (303, "/login"), path
                else:
                    assert r.status_code == 401, (path, headers, r.status_code)
                    assert r.headers["www-authenticate"].startswith("Bearer")
            for w, token in ((a, NEW), (a, OLD), (b, OLD)):
                assert c.get(f"{w.url}{path}", headers=bearer(token)).status_code == 200, (w.name, path, token)
            assert c.get(f"{b.url}{path}", headers=bearer(NEW)).status_code in (303, 401), path
        metrics = c.get(f"{a.url}/metrics", headers=bearer(OLD)).text
        own = {int(p) for p in c.get(f"{a.url}/api/local", headers=bearer(NEW)).json()["books"]}
    assert "callstream_worker_ready 1.0" in metrics
    lag = re.findall(r'callstream_worker_consumer_lag\{partition="(\d+)",topic="([^"]+)"\} (\S+)', metrics)
    assert own and {int(p) for p, _, _ in lag} == own  # this worker's partitions, of every topic it reads
    assert {t for _, t, _ in lag} >= {f"{topics}.call_started", f"{topics}.call_analyzed"}
    assert all(t.startswith(f"{topics}.") and float(n) >= 0 for _, t, n in lag)
    for w in (a, b):
        assert NEW not in w.output() and OLD not in w.output(), "a token reached the log"
