"""Gateway fixtures: gateways as real processes with their own settings, signed requests, and a
broker of a test's own for tests that stop it."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callstream.localkafka import KAFKA_VERSION, LocalKafka, free_port
from callstream.procs import Process as Service
from kernel.signature import sign
from tests.support.kafka import topic_counts
from tests.support.paths import KAFKA_JARS


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A real broker for this test alone, on free ports, which the test may stop and start again
    (same ports, same data); never the session broker."""
    broker = LocalKafka(
        home=tmp_path / "own-kafka",
        port=free_port(),
        controller_port=free_port(),
        heap="512m",
        jars=KAFKA_JARS / KAFKA_VERSION,
    )
    broker.start(wait=120)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def make_gateway(start_service: Callable[..., Service]) -> Iterator[Callable[..., Service]]:
    """Start `callstream gateway` with extra CALLSTREAM_* settings; wait until it answers /healthz.

    Each is stopped with SIGTERM afterwards: with --workers, a SIGKILLed supervisor would leave
    its worker processes running.
    """
    started: list[Service] = []

    def start(*args: str, gateway_args: tuple[str, ...] = (), **env: str) -> Service:
        port = free_port()
        svc = start_service(
            "gateway", *args, "gateway", "--port", str(port), *gateway_args, url=f"http://127.0.0.1:{port}", env=env
        )
        started.append(svc)
        svc.wait_http("/healthz")
        return svc

    yield start
    for svc in started:
        svc.stop(signal.SIGTERM, timeout=20)


@pytest.fixture
def post(api_key: str) -> Callable[..., httpx.Response]:
    """POST a body to a gateway, signed with the test's key unless told otherwise."""

    def send(svc: Service, body: bytes, signature: Any = ..., **headers: str) -> httpx.Response:
        h = {"content-type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
        sig = sign(body, api_key) if signature is ... else signature
        if sig is not None:
            h["x-retell-signature"] = sig
        return httpx.post(f"{svc.url}/webhook", content=body, headers=h, timeout=15)

    return send


@pytest.fixture
def counts(kafka_bootstrap: str, prefix: str) -> Callable[[], dict[str, int]]:
    return lambda: topic_counts(kafka_bootstrap, prefix)
