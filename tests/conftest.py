"""Shared fixtures: one real Kafka broker per test session, a topic prefix per test, real processes.

The broker is the real Apache Kafka that `callstream kafka start` runs, started on free ports in a
temporary folder (the jars are cached in the repo's .kafka/ folder). Set CALLSTREAM_KAFKA_BOOTSTRAP
to use a broker you already run instead; every test uses its own uuid-named topic prefix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from callstream.localkafka import LocalKafka, free_port
from callstream.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    home = tmp_path_factory.mktemp("kafka")
    broker = LocalKafka(home=home, port=free_port(), controller_port=free_port(), heap="768m",
                        jars=REPO / ".kafka" / "jars" / _kafka_version())
    broker.start(wait=120)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def _kafka_version() -> str:
    from callstream.localkafka import KAFKA_VERSION

    return KAFKA_VERSION


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other's messages."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def topics(kafka_bootstrap: str, prefix: str) -> str:
    """Create every topic under this test's prefix; return the prefix."""
    ensure_topics(kafka_bootstrap, prefix, partitions=3)
    return prefix


@pytest.fixture
def api_key() -> str:
    return f"key_{uuid.uuid4().hex}"


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_http(self, path: str, timeout: float = 60.0, ok: Callable[[httpx.Response], bool] | None = None) -> httpx.Response:
        assert self.url, f"{self.name} has no URL"
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                r = httpx.get(self.url + path, timeout=2.0)
                if (ok or (lambda r: r.status_code < 500))(r):
                    return r
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"{self.name} did not answer {path} in {timeout}s ({last}):\n{self.output()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def service_env(kafka_bootstrap: str, prefix: str, api_key: str, tmp_path: Path) -> dict[str, str]:
    """The environment of callstream processes started by this test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap,
        CALLSTREAM_TOPIC_PREFIX=prefix,
        CALLSTREAM_API_KEYS=api_key,
        CALLSTREAM_WAREHOUSE=str(tmp_path / "warehouse.duckdb"),
        CALLSTREAM_PARQUET_DIR=str(tmp_path / "parquet"),
        CALLSTREAM_DATA_DIR=str(tmp_path / "faust"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start_service(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start `python -m callstream <args>` as a real process; every one is stopped after the test."""
    started: list[Service] = []

    def start(name: str, *args: str, url: str | None = None, env: dict[str, str] | None = None) -> Service:
        log = tmp_path / f"{name}-{len(started)}.log"
        out = open(log, "wb")  # noqa: SIM115 (the child keeps it open)
        proc = subprocess.Popen(
            [sys.executable, "-m", "callstream", *args], env={**service_env, **(env or {})},
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
        )
        svc = Service(name, proc, log, url)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop(signal.SIGKILL if svc.proc.poll() is None else signal.SIGTERM, timeout=10)


@pytest.fixture
def gateway_service(start_service: Callable[..., Service]) -> Service:
    port = free_port()
    svc = start_service("gateway", "gateway", "--port", str(port), url=f"http://127.0.0.1:{port}")
    svc.wait_http("/healthz")
    return svc


def consume_all(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list[Message]:
    """Read `topic` from the beginning until `expect` messages arrived or `timeout` passed."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expect and time.monotonic() < deadline:
            for m in c.consume(num_messages=500, timeout=0.5):
                if m.error() is None:
                    got.append(m)
    finally:
        c.close()
    return got


@pytest.fixture
def consume(kafka_bootstrap: str) -> Callable[..., list[Message]]:
    def read(topic: str, expect: int, timeout: float = 30.0) -> list[Message]:
        return consume_all(kafka_bootstrap, topic, expect, timeout)

    return read
