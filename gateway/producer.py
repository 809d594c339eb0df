"""An asyncio face on confluent-kafka's idempotent producer.

confluent-kafka's `AIOProducer` refuses per-message headers, so we drive the plain `Producer`: a
thread polls it for delivery reports and each report resolves the asyncio future of its message
on the event loop. `enable.idempotence=true` gives acks=all and per-partition ordering, so a 204
means the broker has the message on every in-sync replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from gateway.errors import PublishError, PublishTimeout

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]


class EventProducer:
    """Publishes raw bodies and tells the caller, asynchronously, when Kafka has them."""

    def __init__(self, bootstrap: str, timeout_s: float = 5.0, extra: dict[str, Any] | None = None) -> None:
        self.timeout_s = timeout_s
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1,
            "compression.type": "lz4",
            "queue.buffering.max.kbytes": 262144,
            # librdkafka keeps retrying a message while the broker is away; we answer 503 at our own
            # deadline and the sender retries, so a late success is a duplicate, never a loss.
            "message.timeout.ms": 60000,
            "socket.keepalive.enable": True,
            "client.id": "callstream-gateway",
            "error_cb": self._on_error,
            # librdkafka's own log lines through Python logging (else it writes to stderr itself).
            "logger": logging.getLogger("gateway.kafka"),
        }
        conf.update(extra or {})
        self._producer = Producer(conf)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery-poller", daemon=True)
        self._poller.start()

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        # Connection failures are logged by librdkafka itself; say once when no broker is left.
        if err.fatal():
            log.error("kafka producer fatal error: %s", err.str())
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("kafka: every broker is down; deliveries get 503 until one is back")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    @staticmethod
    def _settle(fut: asyncio.Future[None], err: KafkaError | None) -> None:
        if fut.done():  # the request gave up already (timeout or client gone)
            return
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(PublishError(f"Kafka refused the message: {err.str()}"))

    async def publish(self, topic: str, key: str | None, value: bytes, headers: Headers) -> None:
        """Return once Kafka has acknowledged the message; raise `PublishError` otherwise."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            loop.call_soon_threadsafe(self._settle, fut, err)

        try:
            self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
        except BufferError as exc:
            raise PublishError("the producer queue is full; Kafka is not keeping up") from exc
        except KafkaException as exc:
            raise PublishError(f"cannot produce to {topic}: {exc}") from exc
        # A timer that fails the future is far cheaper per message than asyncio.wait_for.
        timer = loop.call_later(self.timeout_s, self._expire, fut)
        try:
            await fut
        finally:
            timer.cancel()

    def _expire(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_exception(PublishTimeout(f"Kafka did not acknowledge within {self.timeout_s:.1f}s"))

    def ready(self, timeout: float = 2.0) -> bool:
        """True when a broker answers a metadata request (for /readyz)."""
        try:
            self._producer.list_topics(timeout=timeout)
            return True
        except KafkaException:
            return False

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued and stop the poller; return how many messages were still unsent."""
        remaining = self._producer.flush(timeout)
        self._stop.set()
        self._poller.join(timeout=2)
        if remaining:
            log.warning("%d messages were still unacknowledged at shutdown", remaining)
        return int(remaining)
