"""Faust's Kafka transport and monitor with less work per message.

Faust's fetch loop hands every message to the streams with
`await consumer.wait_first(callback(message), suspend_flow.wait())`: four tasks and an
`asyncio.wait` per message, so that a hand-off blocked on a full buffer is released when a
rebalance suspends the flow. That bookkeeping was an eighth of the worker's CPU. Almost every
hand-off never blocks, so this consumer first runs the hand-off directly; only one that really
suspends takes Faust's original path, with the rest of the same coroutine, so the rebalance
behaviour is unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Coroutine, Generator, Mapping
from typing import Any, cast

import faust
import faust.tables
from faust.sensors import Monitor
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.services import Service, WaitArgT, WaitResults


class _Resume:
    """An awaitable that carries on a coroutine already run up to its first suspension."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.yielded
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # cancellation included: the coroutine must see it
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class FastWaitFirst(Service):
    """`wait_first` that runs a first coroutine directly, and waits the usual way only if it suspends."""

    async def wait_first(self, *coros: WaitArgT, timeout: Any = None) -> WaitResults:
        first = coros[0] if coros else None
        if inspect.iscoroutine(first) and not (self._stopped.is_set() or self._crashed.is_set()):
            try:
                yielded = first.send(None)
            except StopIteration as stop:
                for other in coros[1:]:
                    if inspect.iscoroutine(other):
                        other.close()  # never started: closing it avoids "never awaited"
                return WaitResults([first], [stop.value], False)
            coros = (_Resume(first, yielded), *coros[1:])
        return await super().wait_first(*coros, timeout=timeout)


class Consumer(FastWaitFirst, faust_aiokafka.Consumer):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek to the committed offsets, and partitions with none (or 0) to their beginning.

        aiokafka seeks only partitions whose committed offset is above 0 and leaves the others
        where the fetcher is. After a rebalance Faust resumes the partitions, then seeks, then
        resumes the flow, which drops what was fetched meanwhile: a partition without a commit
        (a worker killed before its first commit of it) was then read on from there, and the
        events fetched in between were never processed. From the beginning, the ones already
        counted are recognised by the calls' states.
        """
        committed = await super().seek_to_committed()
        changelogs = self.app.tables.changelog_topics
        fresh = [tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs]
        if fresh:
            # The aiokafka consumer lives on Faust's consumer thread: call it there.
            thread = cast(faust_aiokafka.AIOKafkaConsumerThread, self._thread)
            await thread.call_thread(
                thread._ensure_consumer().seek_to_beginning, *(faust_aiokafka.ensure_aiokafka_TP(tp) for tp in fresh)
            )
        return committed


class LeanMonitor(Monitor):
    """Faust's monitor without its per-message and per-event statistics.

    They feed Faust's own stats pages, which the worker does not serve (its numbers come from the
    processor), and cost a few dict updates and clock reads per message. Commit, rebalance and
    end-offset tracking, which Faust itself reads, are kept.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> dict[str, Any] | None:
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class TableManager(faust.tables.TableManager):
    """Faust's table manager, whose changelog queue is still emptied when the flow resumes."""

    @property
    def changelog_queue(self) -> Any:
        if self._changelog_queue is None:
            self._changelog_queue = cast(App, self.app).clearing_flow_control_queue(self.app.conf.stream_buffer_maxsize)
        return self._changelog_queue


class App(faust.App):
    """A Faust app whose consumer uses the cheaper hand-off above and the lean monitor.

    Its channels and streams keep their queued messages when the flow resumes. Faust empties
    them then, but after a rebalance it resumes the partitions and seeks them before it resumes
    the flow, so messages fetched after a seek were dropped and never read again (a takeover
    lost events). Messages of an earlier generation are still skipped by the streams, unacked,
    and read again from the committed offsets. The changelog queue is still emptied: recovery
    seeks its partitions itself and counts on not seeing old events.
    """

    def __init__(self, id: str, **kwargs: Any) -> None:
        kwargs.setdefault("Monitor", LeanMonitor)
        kwargs.setdefault("TableManager", TableManager)
        super().__init__(id, **kwargs)

    def FlowControlQueue(self, maxsize: int | None = None, *, clear_on_resume: bool = False) -> Any:
        return super().FlowControlQueue(maxsize, clear_on_resume=False)

    def clearing_flow_control_queue(self, maxsize: int | None = None) -> Any:
        return super().FlowControlQueue(maxsize, clear_on_resume=True)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
