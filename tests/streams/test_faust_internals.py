"""What the worker changes in Faust: the cheaper message hand-off gives the same results as mode's
`wait_first`, partitions without a committed offset are read from their beginning, queued messages
survive a resumed flow, the event topics' fetches go to the batch handler whole and are acked."""

from __future__ import annotations

import asyncio
import functools
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP
from mode import Service

from streams.faust_internals import App, Consumer, FastWaitFirst, LeanMonitor, Records, TableManager
from streams.settings import WorkerSettings
from streams.worker import Worker


def sync(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(asyncio.wait_for(test(), 10))

    return run


class Waiter(FastWaitFirst, Service):
    pass


class Plain(Service):
    pass


async def _done(value: int) -> int:
    return value


async def _after(fut: asyncio.Future[int], bump: int) -> int:
    return await fut + bump


async def _fails_after(fut: asyncio.Future[int]) -> int:
    await fut
    raise ValueError("boom")


@sync
async def test_a_handoff_that_never_suspends_returns_at_once_and_closes_the_rest() -> None:
    s, flow = Waiter(), asyncio.Event()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "coroutine was never awaited" warning would fail here
        res = await s.wait_first(_done(7), flow.wait())
    assert (res.results, res.stopped) == ([7], False)


@sync
async def test_a_handoff_that_suspends_finishes_through_the_usual_wait() -> None:
    s = Waiter()
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, fut.set_result, 40)
    res = await s.wait_first(_after(fut, 2), asyncio.Event().wait())
    assert 42 in res.results and not res.stopped


@sync
async def test_an_error_after_suspending_propagates_as_in_mode() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, fut.set_result, 1)
    with pytest.raises(ValueError, match="boom"):
        await Waiter().wait_first(_fails_after(fut), asyncio.Event().wait())


@sync
async def test_a_suspended_handoff_is_released_by_the_flow_event_like_mode() -> None:
    """A rebalance sets the flow event while a hand-off is blocked: both waits return, unfinished."""
    results = []
    for cls in (Waiter, Plain):
        blocker: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        flow = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, flow.set)
        res = await cls().wait_first(_after(blocker, 0), flow.wait())
        results.append((res.results, res.stopped))
        blocker.cancel()
    assert results[0] == results[1] == ([True], False)


@sync
async def test_a_stopped_service_takes_modes_path() -> None:
    s = Waiter()
    s._stopped.set()
    res = await s.wait_first(_done(1), asyncio.Event().wait())
    assert res.stopped


def test_the_lean_monitor_skips_per_message_statistics() -> None:
    m = LeanMonitor()
    assert m.on_stream_event_in(None, 0, None, None) is None
    m.on_message_in(None, 0, None)
    assert m.messages_received_total == 0


class FakeKafkaThread:
    """Faust's consumer thread, as far as seeking goes: committed offsets in, seeks recorded."""

    def __init__(self, committed: dict[TP, int | None]) -> None:
        self.committed = committed
        self.to_beginning: list[Any] = []

    async def seek_to_committed(self) -> dict[TP, int | None]:
        return self.committed

    async def call_thread(self, fun: Callable[..., Any], *args: Any) -> Any:
        return await fun(*args)

    def _ensure_consumer(self) -> FakeKafkaThread:
        return self

    async def seek_to_beginning(self, *tps: Any) -> None:
        self.to_beginning.extend((tp.topic, tp.partition) for tp in tps)


@sync
async def test_partitions_without_a_committed_offset_are_read_from_their_beginning() -> None:
    app = Worker(WorkerSettings(kafka_bootstrap="127.0.0.1:1", topic_prefix="tseek")).app
    app.finalize()
    changelog = next(iter(app.tables.changelog_topics))
    committed: dict[TP, int | None] = {
        TP("tseek.call_started", 0): 12,  # aiokafka seeks this one itself
        TP("tseek.call_started", 1): None,  # never committed: a worker died before its first commit
        TP("tseek.call_ended", 2): 0,
        TP(changelog, 0): None,  # Faust's recovery positions the changelog, not the committed offsets
    }
    fake = FakeKafkaThread(committed)
    consumer = cast(Consumer, app.consumer)
    consumer._thread = fake  # type: ignore[assignment]
    assert await consumer.seek_to_committed() == committed
    assert sorted(fake.to_beginning) == [("tseek.call_ended", 2), ("tseek.call_started", 1)]


@sync
async def test_resuming_the_flow_keeps_queued_messages_but_empties_the_changelog_queue() -> None:
    app = Worker(WorkerSettings(kafka_bootstrap="127.0.0.1:1", topic_prefix="tflow")).app
    app.finalize()
    channel_queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)  # as Faust's channels ask
    changelog_queue = cast(TableManager, app.tables).changelog_queue
    channel_queue.put_nowait("fetched after the seek")
    changelog_queue.put_nowait("an old changelog event")
    app.flow_control.suspend()
    app.flow_control.resume()
    assert channel_queue.qsize() == 1
    assert changelog_queue.qsize() == 0


def _records(topic: str, partition: int, offsets: list[int]) -> list[ConsumerRecord[bytes, bytes]]:
    return [ConsumerRecord(topic, partition, o, 0, 0, b"k", b"v", None, 1, 1, []) for o in offsets]


class Fetches:
    """The worker's app with Faust's fetch replaced by the given record maps, and a recording handler."""

    def __init__(self, prefix: str) -> None:
        self.app = cast(App, Worker(WorkerSettings(kafka_bootstrap="127.0.0.1:1", topic_prefix=prefix)).app)
        self.app.finalize()
        self.handled: list[dict[TP, list[int]]] = []
        self.app.batch_handler = self.handle
        self.consumer = cast(Consumer, self.app.consumer)
        self.commits = 0

        async def commit(*args: Any, **kwargs: Any) -> bool:
            self.commits += 1
            return True

        self.consumer.commit = commit  # type: ignore[method-assign]

    async def handle(self, records: Records) -> None:
        self.handled.append({tp: [r.offset for r in recs] for tp, recs in records.items()})

    async def fetch(self, records: dict[TP, list[ConsumerRecord[bytes, bytes]]], *, rebalance: bool = False) -> Any:
        async def getmany(active_partitions: Any, timeout: float) -> Any:
            if rebalance:  # one starts while the fetch waits: Faust stops the flow
                self.consumer.stop_flow()
            return records

        self.consumer._getmany = getmany  # type: ignore[method-assign]
        self.consumer._get_active_partitions = lambda: set(records)  # type: ignore[method-assign]
        rest, _ = await self.consumer._wait_next_records(0.1)
        return rest


@sync
async def test_a_fetch_of_the_event_topics_goes_to_the_handler_whole_and_is_acked() -> None:
    f = Fetches("tbatch")
    started, ended, changelog = TP("tbatch.call_started", 0), TP("tbatch.call_ended", 1), TP("other", 0)
    other = _records("other", 0, [5])
    rest = await f.fetch(
        {started: _records(started.topic, 0, [0, 1, 2]), ended: _records(ended.topic, 1, [7]), changelog: other}
    )
    assert f.handled == [{started: [0, 1, 2], ended: [7]}]
    assert rest == {changelog: other}  # the rest takes Faust's usual path
    c = f.consumer
    assert c._acked[started] == [0, 1, 2] and c._acked[ended] == [7]
    assert c._new_offset(started) == 3 and c._new_offset(ended) == 8
    assert (c._read_offset[started], c._read_offset[ended]) == (2, 7)


@sync
async def test_gaps_are_acked_and_records_read_already_are_not_handled_again() -> None:
    f = Fetches("tgap")
    tp = TP("tgap.call_started", 0)
    await f.fetch({tp: _records(tp.topic, 0, [0, 1])})
    await f.fetch({tp: _records(tp.topic, 0, [1, 4, 5])})  # 1 again; 2 and 3 are transaction markers
    assert f.handled == [{tp: [0, 1]}, {tp: [1, 4, 5]}]  # Faust hands the last one read again too
    assert f.consumer._acked[tp] == [0, 1, 2, 3, 4, 5]  # each offset once, the markers included
    assert f.consumer._new_offset(tp) == 6
    f.consumer._read_offset[tp] = 10  # sought past them
    await f.fetch({tp: _records(tp.topic, 0, [6, 7])})
    assert len(f.handled) == 2


@sync
async def test_a_fetch_that_a_rebalance_stopped_is_not_handled_and_a_full_ack_count_commits() -> None:
    f = Fetches("tflowstop")
    tp = TP("tflowstop.call_started", 0)
    await f.fetch({tp: _records(tp.topic, 0, [0, 1])}, rebalance=True)
    assert f.handled == [] and not f.consumer._acked[tp]
    f.consumer.resume_flow()
    f.consumer._commit_every = 3
    await f.fetch({tp: _records(tp.topic, 0, [0, 1])})
    assert f.commits == 0
    await f.fetch({tp: _records(tp.topic, 0, [2])})
    assert f.commits == 1


@sync
async def test_waiting_for_the_streams_to_empty_waits_for_the_batch_being_handled() -> None:
    f = Fetches("twait")
    tp = TP("twait.call_started", 0)
    release = asyncio.Event()

    async def slow(records: Records) -> None:
        await release.wait()

    f.app.batch_handler = slow
    fetch = asyncio.ensure_future(f.fetch({tp: _records(tp.topic, 0, [0])}))
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(f.consumer.wait_empty())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    release.set()
    await fetch
    await waiting


@sync
async def test_a_batch_that_fails_crashes_the_consumer_and_is_not_acked() -> None:
    f = Fetches("tfail")
    tp = TP("tfail.call_started", 0)

    async def fails(records: Records) -> None:
        raise RuntimeError("the processor failed")

    f.app.batch_handler = fails
    with pytest.raises(RuntimeError):
        await f.fetch({tp: _records(tp.topic, 0, [0, 1])})
    assert f.consumer._crashed.is_set()
    assert not f.consumer._acked[tp]
