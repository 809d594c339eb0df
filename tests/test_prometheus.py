"""prometheus/: promtool checks the shipped config and rules (and their unit tests), and Debian's
real Prometheus, run with the shipped scrape config pointed at a real gateway, worker and sink,
scrapes them (the worker with its bearer token) and evaluates the shipped rules on their series."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from callstream.localkafka import free_port
from callstream.procs import Process, spawn
from callstream.simulate import SimulationPlan
from callstream.simulate import run as simulate
from tests.support.paths import REPO

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SHIPPED = REPO / "prometheus"
TOKEN = "prometheus-scrape-token-0123456789"
needs_prometheus = pytest.mark.skipif(
    not (Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()),
    reason="needs Debian's prometheus package (make test installs it)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=SHIPPED)


def localized(targets: dict[str, str], token_file: Path, interval: str = "1s") -> dict[str, Any]:
    """The shipped prometheus.yml with this machine's targets, token file and a short interval."""
    cfg: dict[str, Any] = yaml.safe_load((SHIPPED / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    cfg["rule_files"] = [str(SHIPPED / f) for f in cfg["rule_files"]]
    for job in cfg["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token_file)
    return cfg


@needs_prometheus
def test_promtool_checks_the_shipped_config_and_rules(tmp_path: Path) -> None:
    rules = promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0 and "SUCCESS: 8 rules found" in rules.stdout, rules.stdout + rules.stderr
    syntax = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    # In full (it opens the token file): the same config with a token file that exists.
    token = tmp_path / "token"
    token.write_text(TOKEN)
    cfg = localized({"callstream-gateway": "g:1", "callstream-worker": "w:2", "callstream-sink": "s:3"}, token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    full = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert full.returncode == 0, full.stdout + full.stderr


@needs_prometheus
def test_the_alerting_rules_fire_as_their_unit_tests_say() -> None:
    r = promtool("test", "rules", "alerts.test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        got = self.query(expr)
        return float(got[0]["value"][1]) if len(got) == 1 else None

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"Prometheus: {what} within {timeout:.0f}s; targets: {self.targets()}"
            time.sleep(0.5)

    def targets(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=10)
        return list(r.json()["data"]["activeTargets"])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Prom]]:
    started: list[Process] = []

    def start(cfg: dict[str, Any]) -> Prom:
        folder = tmp_path / "prometheus"
        folder.mkdir()
        (folder / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        port = free_port()
        cmd = [
            PROMETHEUS,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        proc = spawn("prometheus", cmd, folder / "prometheus.log", cwd=folder, url=f"http://127.0.0.1:{port}")
        started.append(proc)
        proc.wait_http("/-/ready", timeout=60, ok=lambda r: r.status_code == 200)
        return Prom(proc.url or "")

    yield start
    for proc in started:
        proc.stop()


@needs_prometheus
@pytest.mark.kafka
@pytest.mark.slow
def test_prometheus_scrapes_the_services_and_evaluates_the_rules(
    topics: str,
    api_key: str,
    gateway_service: Process,
    start_service: Callable[..., Process],
    prometheus: Callable[[dict[str, Any]], Prom],
    tmp_path: Path,
) -> None:
    web, sink_port = free_port(), free_port()
    worker = start_service(
        "worker",
        "worker",
        "--web-port",
        str(web),
        url=f"http://127.0.0.1:{web}",
        env={"CALLSTREAM_DASHBOARD_TOKENS": f"older-token-0123456789,{TOKEN}"},
    )
    start_service("sink", "sink", env={"CALLSTREAM_SINK_METRICS_PORT": str(sink_port)})
    worker.wait_http("/readyz", timeout=120, ok=lambda r: r.status_code == 200)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    local = {
        "callstream-gateway": gateway_service.url.removeprefix("http://") if gateway_service.url else "",
        "callstream-worker": f"127.0.0.1:{web}",
        "callstream-sink": f"127.0.0.1:{sink_port}",
    }
    cfg = localized(local, token)
    # The same worker once more, without the token: Prometheus must be turned away.
    cfg["scrape_configs"].append(
        {"job_name": "worker-without-token", "static_configs": [{"targets": [local["callstream-worker"]]}]}
    )
    prom = prometheus(cfg)

    res = asyncio.run(
        simulate(f"{gateway_service.url}/webhook", api_key, SimulationPlan(calls=30, rate=300, seed=11, agents=2))
    )
    assert res.failed == 0 and res.statuses[204] > 0

    def up(job: str) -> bool:
        return prom.value(f'up{{job="{job}"}}') == 1.0

    for job in ("callstream-gateway", "callstream-worker", "callstream-sink"):
        prom.wait(f"{job} is up", lambda job=job: up(job))
    prom.wait(
        "the gateway's 204s",
        lambda: prom.value('sum(callstream_gateway_requests_total{status="204"})') == res.statuses[204],
    )
    prom.wait(
        "the worker's distinct calls",
        lambda: prom.value('sum(callstream_calls_total{agent="all", kind="calls"})') == len(res.calls),
    )
    prom.wait("the worker ready", lambda: prom.value("callstream_worker_ready") == 1.0)
    prom.wait("no worker lag", lambda: prom.value("sum(callstream_worker_consumer_lag)") == 0.0)
    prom.wait("no sink lag", lambda: prom.value("sum(callstream_sink_consumer_lag)") == 0.0)
    worker_lag = prom.query(f'callstream_worker_consumer_lag{{topic="{topics}.call_ended"}}')
    assert sorted(int(s["metric"]["partition"]) for s in worker_lag) == [0, 1, 2]
    sink_lag = prom.query("callstream_sink_consumer_lag")
    assert {(s["metric"]["topic"], s["metric"]["partition"]) for s in sink_lag} == {
        (f"{topics}.{t}", str(p)) for t in ("call_analyzed", "chat_analyzed") for p in range(3)
    }
    analyzed = res.accepted_by_event["call_analyzed"] + res.accepted_by_event["chat_analyzed"]
    assert (prom.value("callstream_sink_records_total") or 0) >= analyzed

    (refused,) = [t for t in prom.targets() if t["labels"]["job"] == "worker-without-token"]
    assert refused["health"] == "down" and "401" in refused["lastError"], refused

    def rules_evaluated() -> bool:
        groups = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == 8 and all(
            r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2") for r in rules
        )

    prom.wait("every shipped rule evaluated without error", rules_evaluated)
