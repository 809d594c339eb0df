"""The Faust agent itself, with agent.test_context() and the app's memory store (no broker).

The Kafka producer is the one thing replaced: the changelog writes a batch would send are
recorded instead, to check they go to the partition of the call.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import free_port
from streams.metrics import ALL
from streams.settings import WorkerSettings
from streams.worker import Worker


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    w = Worker(WorkerSettings(topic_prefix="unit", data_dir=str(tmp_path), web_port=free_port()))
    w.app.finalize()
    w.app.flow_control.resume()
    return w


def test_agent_counts_a_call_once_and_writes_to_its_partition(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    store, processor, agent = worker.store, worker.processor, worker.agent
    written: list[tuple[int, bytes, bytes | None]] = []

    async def record() -> dict[int, asyncio.Future[None]]:
        written.extend(store.pending)
        store.pending = []
        return {}

    monkeypatch.setattr(store, "flush", record)
    evs = CallFactory(Fleet(seed=4, agents=1), seed=4, turns=(2, 4)).events("completed")
    now = str(int(time.time() * 1000)).encode()

    async def go() -> dict[str, int]:
        async with agent.test_context() as ctx:
            for ev in evs + evs:  # every delivery twice
                await ctx.put(
                    ev.body(),
                    key=ev.key.encode(),
                    partition=2,
                    wait=False,
                    headers=[("event", ev.event.encode()), ("received_at", now)],
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                book = processor.books.get(2)
                if book and book.totals.get(ALL) and book.totals[ALL].counts.get("calls_analyzed"):
                    break
                await asyncio.sleep(0.02)
            return processor.book(2).totals[ALL].counts

    c = asyncio.run(go())
    assert (c["calls"], c["calls_started"], c["calls_ended"], c["calls_analyzed"]) == (1, 1, 1, 1)
    assert c["event:transcript_updated"] == sum(e.event == "transcript_updated" for e in evs)
    assert written and {p for p, _, _ in written} == {2}
    assert (2, b"c:" + evs[0].key.encode()) in {(p, k) for p, k, _ in written}
