"""What the worker changes in Faust: the cheaper message hand-off gives the same results as mode's
`wait_first`, partitions without a committed offset are read from their beginning, queued messages
survive a resumed flow."""

from __future__ import annotations

import asyncio
import functools
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest
from faust.types import TP
from mode import Service

from streams.faust_internals import Consumer, FastWaitFirst, LeanMonitor, TableManager
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
