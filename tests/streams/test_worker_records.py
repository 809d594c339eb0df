"""The worker's batch handler, fed the records a fetch hands it, with the app's memory store (no broker).

The Kafka producer is the one thing replaced: the changelog writes a batch would send are
recorded instead, to check they go to the partition of the call.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import free_port
from streams.metrics import ALL
from streams.settings import WorkerSettings
from streams.worker import Worker


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    w = Worker(WorkerSettings(topic_prefix="unit", data_dir=str(tmp_path), web_port=free_port()))
    w.app.finalize()
    return w


def _record(
    topic: str, partition: int, offset: int, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic, partition, offset, 0, 0, key, value, None, len(key), len(value), headers)


def test_a_batch_counts_a_call_once_and_writes_to_its_partition(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, processor = worker.store, worker.processor
    written: list[tuple[int, bytes, bytes | None]] = []

    async def record() -> dict[int, asyncio.Future[None]]:
        written.extend(store.pending)
        store.pending = []
        return {}

    monkeypatch.setattr(store, "flush", record)
    evs = CallFactory(Fleet(seed=4, agents=1), seed=4, turns=(2, 4)).events("completed")
    now = str(int(time.time() * 1000)).encode()
    records: dict[TP, list[ConsumerRecord[bytes, bytes]]] = {}
    for offset, ev in enumerate(evs + evs):  # every delivery twice
        topic = f"unit.{ev.event}"
        headers = [("event", ev.event.encode()), ("received_at", now)]
        records.setdefault(TP(topic, 2), []).append(_record(topic, 2, offset, ev.key.encode(), ev.body(), headers))

    async def go() -> dict[str, int]:
        await worker.process_records(records)
        return processor.book(2).totals[ALL].counts

    c = asyncio.run(go())
    assert (c["calls"], c["calls_started"], c["calls_ended"], c["calls_analyzed"]) == (1, 1, 1, 1)
    assert c["event:transcript_updated"] == sum(e.event == "transcript_updated" for e in evs)
    assert written and {p for p, _, _ in written} == {2}
    assert (2, b"c:" + evs[0].key.encode()) in {(p, k) for p, k, _ in written}


def test_a_record_without_usable_headers_takes_its_event_from_the_topic_and_its_time_from_the_record(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = worker.store

    async def drop() -> dict[int, asyncio.Future[None]]:
        store.pending = []
        return {}

    monkeypatch.setattr(store, "flush", drop)
    ev = CallFactory(Fleet(seed=5, agents=1), seed=5).events("completed")[0]
    at = int(time.time() * 1000) - 5000
    headers = [("received_at", b"soon")]  # not a number: the record's timestamp stands in
    rec = ConsumerRecord(f"unit.{ev.event}", 1, 7, at, 0, ev.key.encode(), ev.body(), None, 1, 1, headers)
    asyncio.run(worker.process_records({TP(rec.topic, 1): [rec]}))
    mark = worker.processor.part(1).marks[rec.topic]
    assert (mark.at, mark.next) == (at, 8)
    assert worker.processor.book(1).totals[ALL].counts[f"event:{ev.event}"] == 1
