"""Shared fixtures: one real Kafka broker per test session, a topic prefix per test, real processes.

The broker is the real Apache Kafka that `callstream kafka start` runs, started on free ports in a
temporary folder (the jars are cached in the repo's .kafka/ folder). Set CALLSTREAM_KAFKA_BOOTSTRAP
to use a broker you already run instead; every test uses its own uuid-named topic prefix.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Message

from callstream.localkafka import LocalKafka, free_port
from callstream.procs import Process as Service
from callstream.procs import callstream
from kernel.topics import ensure_topics
from tests.support.kafka import consume_all
from tests.support.paths import REPO


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    home = tmp_path_factory.mktemp("kafka")
    broker = LocalKafka(
        home=home,
        port=free_port(),
        controller_port=free_port(),
        heap="768m",
        jars=REPO / ".kafka" / "jars" / _kafka_version(),
    )
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
        svc = callstream(
            name, args, tmp_path / f"{name}-{len(started)}.log", {**service_env, **(env or {})}, cwd=tmp_path, url=url
        )
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


@pytest.fixture
def consume(kafka_bootstrap: str) -> Callable[..., list[Message]]:
    def read(topic: str, expect: int, timeout: float = 30.0) -> list[Message]:
        return consume_all(kafka_bootstrap, topic, expect, timeout)

    return read
