"""An asyncio face on confluent-kafka's idempotent producer that refuses fast while Kafka is away and
heals by itself.

confluent-kafka's `AIOProducer` refuses per-message headers, so we drive the plain `Producer` (see
`gateway.client`). `enable.idempotence=true` gives acks=all and per-partition ordering, so a 204
means the broker has the message on every in-sync replica.

Two things close the gate, after which `publish` raises `KafkaUnavailable` (503) without touching
librdkafka, and the messages still waiting for an answer fail at once:
  - librdkafka's `_ALL_BROKERS_DOWN`. A watchdog thread then asks for metadata every `recheck_s`
    and opens the gate when a broker answers. A single `_TRANSPORT` error is one connection of
    possibly several, so it closes nothing.
  - a fatal error (a fenced idempotent producer, say). The watchdog replaces the client, and opens
    the gate once the new one reaches a broker.
While the gate is open the watchdog sleeps; `publish` pays an attribute read for the gate and a set
insertion (the futures that a closing gate fails) for all of this.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from gateway.client import Client, Headers, is_fatal
from gateway.errors import KafkaUnavailable, PublishError, PublishTimeout

log = logging.getLogger(__name__)
_kafka_log = logging.getLogger("gateway.kafka")

__all__ = ["EventProducer", "Headers"]


# How long the watchdog's metadata request may take; it runs only while deliveries are refused.
_CHECK_TIMEOUT_S = 1.0


class _KafkaLog:
    """librdkafka's log lines, on `gateway.kafka`. While no broker is reachable, its connection failure
    lines (a dozen a second while the watchdog asks for metadata) go to DEBUG: the gateway's own line
    said it once, and the first failure was logged before that."""

    def __init__(self, outage: Callable[[], bool]) -> None:
        self._outage = outage

    def log(self, level: int, fmt: str, facility: str, *args: Any) -> None:
        if facility == "FAIL" and self._outage():
            level = logging.DEBUG
        _kafka_log.log(level, fmt, facility, *args)


def _expire(fut: asyncio.Future[None], timeout_s: float) -> None:
    if not fut.done():
        fut.set_exception(PublishTimeout(f"Kafka did not acknowledge within {timeout_s:.1f}s"))


class EventProducer:
    """Publishes raw bodies and tells the caller, asynchronously, when Kafka has them."""

    def __init__(
        self, bootstrap: str, timeout_s: float = 5.0, extra: dict[str, Any] | None = None, recheck_s: float = 0.5
    ) -> None:
        self.timeout_s = timeout_s
        self.recheck_s = recheck_s
        self._conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 1,
            "compression.type": "lz4",
            "queue.buffering.max.kbytes": 262144,
            # librdkafka keeps retrying a message while the broker is away; we answer 503 at our own
            # deadline and the sender retries, so a late success is a duplicate, never a loss.
            "message.timeout.ms": 60000,
            # Reconnect at least every second, so that deliveries resume soon after a broker returns.
            "reconnect.backoff.max.ms": 1000,
            # A broker cut off by the network sends no reset: librdkafka would wait its default 60 s
            # for the requests in flight to it before it hands their partitions to the new leaders (the
            # idempotent producer drains them first, to keep the order), and every delivery meanwhile
            # got a 503. Giving up on a silent broker after 10 s bounds that (tests/cluster).
            "socket.timeout.ms": 10000,
            "socket.keepalive.enable": True,
            "client.id": "callstream-gateway",
            # librdkafka's own log lines through Python logging (else it writes to stderr itself).
            "logger": _KafkaLog(lambda: self._announce),
            **(extra or {}),
        }
        self._lock = threading.Lock()
        self._down: str | None = None  # why deliveries are refused now; None: they are not
        self._announce = False  # say so in the log when the gate opens again
        self._epoch = 0  # bumped whenever the gate closes, so that a stale check cannot open it
        self._dead: Client | None = None  # a client after a fatal error, waiting to be replaced
        self._dead_cause = ""  # what killed it, for the one log line
        self._wake = threading.Event()
        self._closing = False
        self.rebuilds = 0
        self.client = Client(self._conf, self._on_error)
        self.client.start()
        self._watchdog = threading.Thread(target=self._watch, name="kafka-watchdog", daemon=True)
        self._watchdog.start()

    # -- the hot path ---------------------------------------------------------------------------

    async def publish(self, topic: str, key: str | None, value: bytes, headers: Headers) -> None:
        """Return once Kafka has acknowledged the message; raise `PublishError` otherwise."""
        down = self._down
        if down is not None:
            raise KafkaUnavailable(down)
        client = self.client
        try:
            fut = client.produce(topic, key, value, headers)
        except BufferError as exc:
            raise PublishError("the producer queue is full; Kafka is not keeping up") from exc
        except KafkaException as exc:
            client.report(exc.args[0])
            raise PublishError(f"cannot produce to {topic}: {exc}") from exc
        except RuntimeError as exc:  # a client closed after a fatal error, in the instant before the swap
            raise KafkaUnavailable(f"the Kafka producer was replaced: {exc}") from exc
        # A timer that fails the future is far cheaper per message than asyncio.wait_for.
        timer = fut.get_loop().call_later(self.timeout_s, _expire, fut, self.timeout_s)
        try:
            await fut
        finally:
            timer.cancel()
            client.pending.discard(fut)

    # -- the gate -------------------------------------------------------------------------------

    def unready_reason(self, timeout: float = 2.0) -> str | None:
        """Why deliveries would fail now (for /readyz), or None when a broker answers."""
        down = self._down
        if down is not None:
            return down
        if self.client.reachable(timeout):
            return None
        return f"no Kafka broker answered a metadata request within {timeout:.0f}s"

    def _on_error(self, client: Client, err: KafkaError) -> None:
        """Every error of every client (poller thread, or the event loop for `produce`)."""
        if client is self._dead:
            if err.fatal():  # the cause itself, after produce() said only `_FATAL`
                self._dead_cause = err.str()
            return
        if client is not self.client:
            return  # the last words of a client already replaced
        if is_fatal(err):
            self._fatal(client, err)
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            reason = f"no Kafka broker is reachable ({err.str()})"
            if self._close_gate(reason, announce=True):
                log.warning("kafka: %s; deliveries get 503 until a broker answers", reason)
            client.fail_pending_soon(lambda: KafkaUnavailable(reason))

    def _fatal(self, client: Client, err: KafkaError) -> None:
        with self._lock:
            if self._dead is client:
                return
            self._dead, self._dead_cause = client, err.str()
        self._close_gate(f"the Kafka producer is being replaced after a fatal error ({err.str()})", announce=False)

    def _close_gate(self, reason: str, announce: bool) -> bool:
        """Refuse deliveries from now on. True if this outage should be announced and was not yet: the
        log says when Kafka went away and when it came back, once each; a replaced client says it itself."""
        with self._lock:
            first = announce and not self._announce
            self._down = reason
            self._announce = self._announce or announce
            self._epoch += 1
        self._wake.set()
        return first

    # -- the watchdog ---------------------------------------------------------------------------

    def _watch(self) -> None:
        last_build = 0.0
        while True:
            self._wake.wait(None if self._down is None else self.recheck_s)
            self._wake.clear()
            if self._closing:
                return
            dead = self._dead
            if dead is not None:
                # A client that dies at once again must not make this a busy loop.
                time.sleep(max(0.0, last_build + 1.0 - time.monotonic()))
                self._replace(dead)
                last_build = time.monotonic()
            if self._down is not None:
                self._recheck()

    def _replace(self, dead: Client) -> None:
        dead.retire()  # serves what librdkafka still holds, the fatal error's own report included
        log.error("kafka producer fatal error: %s; replacing it with a new producer", self._dead_cause)
        dead.fail_pending_soon(lambda: KafkaUnavailable("the Kafka producer was replaced after a fatal error"))
        fresh = Client(self._conf, self._on_error)
        with self._lock:
            self.client = fresh
            self._dead = None
            self.rebuilds += 1
        fresh.start()

    def _recheck(self) -> None:
        with self._lock:
            epoch, client = self._epoch, self.client
        if self._dead is not None or not client.reachable(_CHECK_TIMEOUT_S):
            return
        with self._lock:
            if epoch != self._epoch or client is not self.client or self._dead is not None:
                return  # the gate closed again meanwhile
            was, announce = self._down, self._announce
            self._down, self._announce = None, False
        if announce:
            log.info("kafka: a broker answers again; accepting deliveries (was: %s)", was)

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued and stop the threads; return how many messages were still unsent."""
        self._closing = True
        self._wake.set()
        self._watchdog.join(timeout=5)
        remaining = self.client.close(timeout)
        if remaining:
            log.warning("%d messages were still unacknowledged at shutdown", remaining)
        return remaining
