"""A fatal producer error under a serving gateway, against the real broker: the delivery it hit gets a
503, the gateway builds a new producer, logs one line, and answers 204 again; every 204 is stored.

The gateway runs in this process (uvicorn on loopback, the real app and EventProducer) so that the
test can reach its librdkafka handle. Two real fatal errors:
  - the broker refuses a message as too large while `enable.gapless.guarantee` is on: librdkafka
    must raise a fatal error rather than leave a gap (the only fatal error a broker can provoke in an
    idempotent producer on demand);
  - a fenced producer, made by librdkafka's own test hook (`rd_kafka_test_fatal_error`), with the
    gateway's production configuration.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
import uvicorn
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from callstream.localkafka import free_port
from gateway.app import create_app
from gateway.producer import EventProducer
from gateway.settings import GatewaySettings
from kernel.signature import sign
from kernel.topics import ensure_topics
from tests.gateway.librdkafka import trigger_fatal
from tests.support.kafka import consume_all

pytestmark = pytest.mark.kafka


@dataclass
class Gateway:
    url: str
    producer: EventProducer

    def post(self, body: bytes, key: str) -> httpx.Response:
        return httpx.post(
            self.url + "/webhook", content=body, headers={"x-retell-signature": sign(body, key)}, timeout=15
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not become ready again"
            time.sleep(0.1)


@pytest.fixture
def serve(kafka_bootstrap: str, prefix: str, api_key: str) -> Iterator[Callable[..., Gateway]]:
    """Serve the real gateway app with the given EventProducer options, in a thread of this process."""
    servers: list[tuple[uvicorn.Server, threading.Thread, EventProducer]] = []

    def start(**producer_options: object) -> Gateway:
        producer = EventProducer(kafka_bootstrap, timeout_s=10, **producer_options)  # type: ignore[arg-type]
        cfg = GatewaySettings(_env_file=None, kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, api_keys=api_key)  # type: ignore[call-arg]
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(cfg, producer), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread, producer))
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        gw = Gateway(f"http://127.0.0.1:{port}", producer)
        gw.wait_ready()
        return gw

    yield start
    for server, thread, producer in servers:
        server.should_exit = True
        thread.join(timeout=20)
        producer.close(timeout=5)


def _call_started() -> bytes:
    call = {"call_id": f"call_{uuid.uuid4().hex}", "agent_id": "agent_f", "call_status": "ongoing"}
    return orjson.dumps({"event": "call_started", "call": call})


async def _burst(gw: Gateway, key: str, bodies: list[bytes]) -> list[tuple[bytes, int]]:
    """All `bodies` at once; (body, status) of each."""
    async with httpx.AsyncClient(timeout=15) as client:

        async def one(body: bytes) -> tuple[bytes, int]:
            r = await client.post(gw.url + "/webhook", content=body, headers={"x-retell-signature": sign(body, key)})
            assert r.status_code in (204, 503), r.text
            if r.status_code == 503:
                assert r.headers["retry-after"]
            return body, r.status_code

        return await asyncio.gather(*(one(b) for b in bodies))


def _fatal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.producer" and "fatal" in r.getMessage()]


def _on_topic(bootstrap: str, topic: str) -> int:
    """Messages on a one-partition topic that this test has written to (so its leader is up)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}"})
    try:
        return int(c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])
    finally:
        c.close()


def _assert_every_204_stored(bootstrap: str, prefix: str, accepted: list[bytes]) -> None:
    topic = f"{prefix}.call_started"
    stored = {m.value() for m in consume_all(bootstrap, topic, expect=_on_topic(bootstrap, topic))}
    assert not [b for b in accepted if b not in stored], "a delivery answered 204 is not on its topic"


def test_a_message_the_broker_refuses_under_the_gapless_guarantee(
    serve, kafka_bootstrap, prefix, api_key, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    small = NewTopic(f"{prefix}.call_analyzed", 1, 1, config={"max.message.bytes": "2000"})
    admin.create_topics([small])[small.topic].result(timeout=30)
    ensure_topics(kafka_bootstrap, prefix, partitions=1)
    gw = serve(extra={"enable.gapless.guarantee": True})
    first = _call_started()
    assert gw.post(first, api_key).status_code == 204

    # Random bytes, so that lz4 cannot bring the batch under the topic's limit.
    noise = base64.b64encode(os.urandom(6000)).decode()
    big = orjson.dumps({"event": "call_analyzed", "call": {"call_id": "call_big", "transcript": noise}})
    # The big one among others, so that some are in flight on the dying producer or sent while it
    # is replaced.
    during = asyncio.run(
        _burst(gw, api_key, [_call_started() for _ in range(10)] + [big] + [_call_started() for _ in range(20)])
    )
    assert (big, 503) in during
    gw.wait_ready()
    after = [_call_started() for _ in range(3)]
    assert [gw.post(b, api_key).status_code for b in after] == [204, 204, 204]

    assert gw.producer.rebuilds == 1
    [line] = _fatal_lines(caplog)
    assert "gap-less" in line
    assert _on_topic(kafka_bootstrap, small.topic) == 0  # the refused message is nowhere
    _assert_every_204_stored(kafka_bootstrap, prefix, [first, *after, *(b for b, s in during if s == 204)])


def test_a_fenced_producer_is_replaced(serve, kafka_bootstrap, prefix, api_key, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    ensure_topics(kafka_bootstrap, prefix, partitions=1)
    gw = serve()
    first = _call_started()
    assert gw.post(first, api_key).status_code == 204
    handle = gw.producer.client.producer  # the gateway's librdkafka handle

    async def fenced_under_load() -> list[tuple[bytes, int]]:
        bodies = [_call_started() for _ in range(40)]
        load = asyncio.create_task(_burst(gw, api_key, bodies))
        await asyncio.sleep(0.01)
        trigger_fatal(handle, "fenced by a test")
        return await load

    during = asyncio.run(fenced_under_load())
    gw.wait_ready()
    after = _call_started()
    assert gw.post(after, api_key).status_code == 204
    assert gw.producer.rebuilds == 1
    [line] = _fatal_lines(caplog)
    assert "fenced by a test" in line
    _assert_every_204_stored(kafka_bootstrap, prefix, [first, after, *(b for b, s in during if s == 204)])
