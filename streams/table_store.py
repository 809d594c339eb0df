"""The processor's Store over the worker's Faust table, whose keys and values are raw bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any, cast

import faust

from streams.faust_internals import kafka_producer, key_partitions, remember_partition

log = logging.getLogger(__name__)


class TableStore:
    """Reads from the table's local data; writes name their changelog partition explicitly.

    The partition is that of the events that caused the write, which is also the partition of the
    key's call (see streams.processor).
    """

    def __init__(self, app: faust.App, table: Any) -> None:
        self.app = app
        self.table = table
        self.pending: list[tuple[int, bytes, bytes | None]] = []
        self.crashing: asyncio.Future[None] | None = None

    def get(self, key: bytes) -> bytes | None:
        value = self.table.data.get(key)
        return cast(bytes | None, value)

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        self.restore(partition, key, value)
        self.pending.append((partition, key, value))

    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        data = self.table.data
        if value is None:
            data.pop(key, None)
            remember_partition(self.table, key, None)
        else:
            data[key] = value
            remember_partition(self.table, key, partition)

    def keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]:
        return (k for k in list(self.table.data.keys()) if k.startswith(prefix))

    def keys_of(self, partition: int, prefix: bytes) -> Iterator[bytes]:
        owned = key_partitions(self.table)
        return (k for k, p in list(owned.items()) if p == partition and k.startswith(prefix))

    async def flush(self) -> dict[int, asyncio.Future[Any]]:
        """Hand the batch's writes to the Kafka producer, in order, before the batch is acked.

        Each partition's writes go in bulk, as record batches built here (`create_batch` and
        `send_batch` of aiokafka's producer), not one `send` each (a future, a pending message and
        a callback per write, a noticeable share of the worker's CPU): the producer flush that
        precedes every offset commit still covers them, and the memory store keeps no persisted
        offsets for a callback to record. Returns, per partition, the future of its last record
        batch: the producer keeps a partition's batches in order, so once it is acknowledged they
        all are.
        """
        pending, self.pending = self.pending, []
        return await self._send_all(pending)

    async def _send_all(self, writes: list[tuple[int, bytes, bytes | None]]) -> dict[int, asyncio.Future[Any]]:
        if not writes:
            return {}
        producer, name = kafka_producer(self.app), self.table.changelog_topic.get_topic_name()
        builders: dict[int, Any] = {}
        last: dict[int, asyncio.Future[Any]] = {}
        for partition, key, value in writes:
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(timestamp=None, key=key, value=value) is None:  # full: send it, start the next
                last[partition] = await self._send_batch(producer, builder, name, partition)
                builder = builders[partition] = producer.create_batch()
                builder.append(timestamp=None, key=key, value=value)  # a batch's first record always fits
        for partition, builder in builders.items():
            last[partition] = await self._send_batch(producer, builder, name, partition)
        return last

    async def _send_batch(self, producer: Any, builder: Any, name: str, partition: int) -> asyncio.Future[Any]:
        builder.close()  # nothing else (the outbox's single sends) joins it: its records stay in order
        fut = cast(asyncio.Future[Any], await producer.send_batch(builder, name, partition=partition))
        fut.add_done_callback(self._sent)
        return fut

    async def delete_now(self, partition: int, keys: list[bytes]) -> asyncio.Future[Any]:
        """Delete keys and send their tombstones to the changelog at once, in one record batch (the
        outbox's deliveries); the future of the last."""
        for key in keys:
            self.restore(partition, key, None)
        sent = await self._send_all([(partition, key, None) for key in keys])
        return sent[partition]

    async def write_now(self, partition: int, key: bytes, value: bytes | None) -> asyncio.Future[Any]:
        """Set a key and send it to the changelog at once, outside any batch (the outbox's deletions)."""
        self.restore(partition, key, value)
        return await self._send(partition, key, value)

    async def _send(self, partition: int, key: bytes, value: bytes | None) -> asyncio.Future[Any]:
        name = self.table.changelog_topic.get_topic_name()
        fut = cast(asyncio.Future[Any], await self.app.producer.send(name, key, value, partition, None, None))
        fut.add_done_callback(self._sent)
        return fut

    def _sent(self, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            # The offsets of the batch must not be committed over a lost state write: stop.
            log.error("changelog write failed, stopping the worker: %s", exc)
            self.crashing = asyncio.ensure_future(self.app.crash(exc))
