"""From Kafka into batches, for both sinks: the consumer's settings, taking what was fetched, and the
open batch of decoded records with the offsets it covers."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import pyarrow as pa
from confluent_kafka import KafkaError, Message, TopicPartition

from kernel.catalogue import Header
from warehouse.dead_letters import DeadLetters
from warehouse.errors import RecordError
from warehouse.records import FamilyBatch, Source
from warehouse.schema import Family

log = logging.getLogger(__name__)


class KafkaConsumer(Protocol):
    """What the sinks use of confluent-kafka's Consumer (a test or the offline stress harness may stand in)."""

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]: ...

    def assign(self, partitions: list[TopicPartition]) -> None: ...

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1) -> tuple[int, int]: ...

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...

    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[True] = ...) -> None: ...

    def close(self) -> None: ...


def consumer_config(bootstrap: str, group: str, queue_kbytes: int) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # librdkafka keeps a fetch buffer while any message from it lives: small fetches keep its
        # memory near the queue size, and a loopback broker answers them faster than a sink decodes.
        "fetch.max.bytes": 4 * 1024 * 1024,
        "max.partition.fetch.bytes": 2 * 1024 * 1024,
        "queued.max.messages.kbytes": queue_kbytes,
        # With the queue full librdkafka waits this long before fetching again; its default, 1 s,
        # leaves a sink that decodes slower than it fetches waiting for messages.
        "fetch.queue.backoff.ms": 10,
    }


def take(consumer: KafkaConsumer, want: int, idle_wait: float) -> list[Message]:
    """The messages already fetched (up to `want`), waiting up to `idle_wait` only when there are none.

    consume() with a timeout waits for all `want` messages, so it is called without one first.
    """
    got = consumer.consume(num_messages=want, timeout=0) or consumer.consume(num_messages=want, timeout=idle_wait)
    out = []
    for msg in got:
        err = msg.error()
        if err is None:
            out.append(msg)
        elif err.code() != KafkaError._PARTITION_EOF:
            log.error("consumer error: %s", err)
    return out


def received_ms(msg: Message) -> int | None:
    """The gateway's `received_at` header, else the message's timestamp."""
    headers: Any = msg.headers() or []
    for k, v in headers:
        if k == Header.RECEIVED_AT and isinstance(v, bytes):
            try:
                return int(v)
            except ValueError:
                break
    kind, ts = msg.timestamp()
    return ts if kind and ts > 0 else None


class OpenBatch:
    """Records decoded since the last batch was closed, per topic, and per partition the offsets of
    its first record and after its last."""

    def __init__(self, families: Mapping[str, Family], max_seconds: float) -> None:
        self.families = {t: FamilyBatch(f) for t, f in families.items()}
        self.first_offsets: dict[tuple[str, int], int] = {}
        self.next_offsets: dict[tuple[str, int], int] = {}
        self.records = 0
        self.bytes = 0
        self.loaded_at_ms = int(time.time() * 1000)
        self.deadline = time.monotonic() + max_seconds

    def add(self, msg: Message, dead_letters: DeadLetters) -> tuple[str, int, int]:
        """Decode one message into the batch (or dead-letter it); return its topic, partition and next offset."""
        t, p, o = str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)
        self.first_offsets.setdefault((t, p), o)
        self.next_offsets[(t, p)] = o + 1
        self.records += 1
        value = msg.value()
        self.bytes += len(value or b"")
        try:
            if not value:
                raise RecordError("the message has no value")
            self.families[t].add(value, Source(p, o, received_ms(msg), self.loaded_at_ms))
        except RecordError as exc:
            dead_letters.send(msg, str(exc))
        return t, p, o + 1

    def due(self, max_records: int, max_bytes: int) -> bool:
        return self.records >= max_records or self.bytes >= max_bytes or time.monotonic() >= self.deadline

    def tables(self) -> dict[str, dict[str, pa.Table]]:
        """Arrow tables per topic with records (a family's tables come out together)."""
        return {t: b.tables() for t, b in self.families.items() if len(b)}
