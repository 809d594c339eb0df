"""The table store's changelog writes: in bulk per partition, in order, a full record batch sent and the next begun."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from callstream.localkafka import free_port
from streams.settings import WorkerSettings
from streams.worker import Worker


class Builder:
    """aiokafka's BatchBuilder as far as the store uses it: full after `room` records."""

    def __init__(self, room: int) -> None:
        self.room, self.records, self.closed = room, list[tuple[bytes, bytes | None]](), False

    def append(self, *, timestamp: Any, key: bytes, value: bytes | None) -> object | None:
        if self.closed or (self.records and len(self.records) >= self.room):
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        self.closed = True


class Producer:
    def __init__(self, room: int) -> None:
        self.room = room
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes | None]]]] = []

    def create_batch(self) -> Builder:
        return Builder(self.room)

    async def send_batch(self, builder: Builder, topic: str, *, partition: int) -> asyncio.Future[None]:
        assert builder.closed
        self.sent.append((topic, partition, builder.records))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def test_a_flush_sends_each_partitions_writes_as_record_batches_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = Worker(WorkerSettings(topic_prefix="tstore", data_dir=str(tmp_path), web_port=free_port()))
    worker.app.finalize()
    producer = Producer(room=2)
    monkeypatch.setattr("streams.table_store.kafka_producer", lambda app: producer)
    store = worker.store
    for key, value in ((b"p:1", b"c"), (b"c:a", b"1"), (b"p:0", b"c0"), (b"c:b", None), (b"e:1", b"1")):
        store.put(0 if key.endswith(b"0") else 1, key, value)

    async def flush() -> dict[int, Any]:
        return await store.flush()

    last = asyncio.run(flush())
    changelog = worker.table.changelog_topic.get_topic_name()
    assert producer.sent == [
        (changelog, 1, [(b"p:1", b"c"), (b"c:a", b"1")]),  # full: sent, the next one begun
        (changelog, 1, [(b"c:b", None), (b"e:1", b"1")]),
        (changelog, 0, [(b"p:0", b"c0")]),
    ]
    assert set(last) == {0, 1} and store.pending == []
    assert store.get(b"c:a") == b"1" and store.get(b"c:b") is None
    assert asyncio.run(flush()) == {} and len(producer.sent) == 3
