"""Every place the worker relies on faust-streaming's (and mode's) internals, and nowhere else.

What a faust-streaming or mode upgrade must re-check, one line each (the tests in
tests/streams/test_faust_internals.py and test_worker.py cover them):

- `mode.Service.wait_first(coro, flow.wait())` is how Faust's fetch loop hands a message to the
  streams, and `Service._stopped` / `_crashed` are the events it stops on (`FastWaitFirst`).
- `Consumer._wait_next_records(timeout)` returns each fetch's records per TP (aiokafka
  `ConsumerRecord`s) and the active partitions, before Faust makes them messages (`Consumer`).
- `Consumer.flow_active`, `_buffered_partitions`, `_read_offset`, `_committed_offset`, `_acked`,
  `_acked_index`, `_n_acked`, `_commit_every`: the fetch loop's filters and the acks its commits
  read (`Consumer._take`, `_ack_through`).
- `Consumer.wait_empty()` is what a rebalance and a stop wait on before committing (`Consumer`).
- `Monitor.stream_inbound_time`, which Faust's livelock check reads per partition (`Consumer._take`).
- `faust.transport.drivers.aiokafka.Consumer.seek_to_committed` and its `_thread` (an
  `AIOKafkaConsumerThread` with `call_thread` and `_ensure_consumer()`): partitions without a
  committed offset are sought to their beginning there (`Consumer`).
- `App.FlowControlQueue(clear_on_resume=...)` and `TableManager._changelog_queue`: which queues are
  emptied when the flow resumes (`App`, `TableManager`).
- `Monitor.on_message_in/out`, `on_stream_event_in/out` are the per-message statistics hooks (`LeanMonitor`).
- `App.BootStrategy.server()` lists the services in start order, and a table's changelog topic is
  declared only when the table manager starts: the topic gate runs before the producer, consumer
  and tables, with the web server already answering (`GatedBoot`, `set_partitions`).
- The memory store's `_key_partition` map, by which it forgets revoked partitions' keys
  (`remember_partition`), and which tells a recovered key's partition (`key_partitions`).
- `ProducerBuffer.max_messages`, the pending sends that stall a stream (`set_producer_buffer`).
- The aiokafka driver's `Producer._settings_extra()`, the extra `AIOKafkaProducer` settings (Faust
  asks for idempotence only in transactions): every producer is idempotent here (`Producer`).
- The aiokafka driver's `Producer._ensure_producer()`, the `AIOKafkaProducer` whose `create_batch`
  and `send_batch` take the changelog writes in bulk; `Producer.flush()`, which Faust awaits
  before committing offsets, flushes that producer too (`kafka_producer`).
- `mode.Worker._schedule_shutdown`, the clean stop a signal starts (`stop_worker`), and
  `execute_from_commandline` ending in `SystemExit` with the crash's status (`run_worker`).
- The aiohttp driver's `Web.web_app`, where the read side's token check sits in front of every
  route (`add_web_middleware`).

The event topics skip Faust's messages, conductor and streams altogether (`App.take_batches`):
each fetch's records of those topics go to one handler whole, and are acked through the last
offset per partition once it returns; Faust's own commits, rebalances and table recovery take it
from there. The rest (the changelog during recovery) takes Faust's usual path.

Faust's message hand-off, in detail: its fetch loop hands every message to the streams with
`await consumer.wait_first(callback(message), suspend_flow.wait())`: four tasks and an
`asyncio.wait` per message, so that a hand-off blocked on a full buffer is released when a
rebalance suspends the flow. Almost every hand-off never blocks, so this consumer first runs the
hand-off directly; only one that really suspends takes Faust's original path, with the rest of the
same coroutine, so the rebalance behaviour is unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Mapping, Sequence
from time import monotonic
from typing import Any, cast

import faust
import faust.tables
from faust.app.base import BootStrategy
from faust.sensors import Monitor
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import ServiceT
from mode.services import Service, WaitArgT, WaitResults
from mode.utils.futures import maybe_cancel


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


# A fetch's records of the batch topics, per partition, in offset order: aiokafka `ConsumerRecord`s.
Records = Mapping[TP, Sequence[Any]]
BatchHandler = Callable[[Records], Awaitable[None]]


class Consumer(FastWaitFirst, faust_aiokafka.Consumer):
    _idle: asyncio.Event | None = None

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        """Faust's fetch, with the batch topics' records taken out and handed to the app's handler."""
        records, active = await super()._wait_next_records(timeout)
        app = cast(App, self.app)
        if records and app.batch_handler is not None:
            topics = app.batch_topics
            taken = {tp: recs for tp, recs in records.items() if tp.topic in topics}
            if taken:
                records = {tp: recs for tp, recs in records.items() if tp.topic not in topics}
                # Not while the flow is stopped (a rebalance): Faust seeks back to the committed offsets.
                if self.flow_active and not self.should_stop:
                    await self._take(app.batch_handler, taken, active)
        return records, active

    async def _take(self, handler: BatchHandler, records: Records, active: Any) -> None:
        read = self._read_offset
        batch: dict[TP, Sequence[Any]] = {}
        for tp, recs in records.items():
            if active is not None and tp not in active and tp not in self._buffered_partitions:
                continue
            start = read[tp]
            if start is not None and recs and recs[0].offset < start:  # as Faust drops them: read already
                recs = [r for r in recs if r.offset >= start]
            if recs:
                batch[tp] = recs
        if not batch:
            return
        idle = self._idle_event()
        idle.clear()
        try:
            await handler(batch)
        except Exception as exc:
            # Skipping the batch would lose its events, and retrying it would fail the same way.
            await self.crash(exc)
            raise
        finally:
            idle.set()
        inbound, now = self.app.monitor.stream_inbound_time, monotonic()
        for tp, recs in batch.items():
            self._ack_through(tp, recs[0].offset, recs[-1].offset)
            read[tp] = recs[-1].offset
            inbound[tp] = now
        every = self._commit_every
        if every is not None and self._n_acked >= every:
            self._n_acked = 0
            await self.commit()

    def _ack_through(self, tp: TP, first: int, last: int) -> None:
        """Ack every offset up to `last` not acked or committed yet, the gaps (transaction markers) too."""
        start = first
        read = self._read_offset[tp]
        if read and first > read + 1:
            start = read + 1
        committed = self._committed_offset[tp]
        if committed is not None:
            start = max(start, committed)
        acked = self._acked[tp]
        if acked:
            start = max(start, acked[-1] + 1)
        if last >= start:
            span = range(start, last + 1)
            acked.extend(span)
            self._acked_index[tp].update(span)
            self._n_acked += len(span)

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    async def wait_empty(self) -> None:
        """Wait for the batch being handled too, as Faust waits for its streams' unacked messages."""
        await self._idle_event().wait()
        await super().wait_empty()

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
            thread = self._thread
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


class Producer(faust_aiokafka.Producer):
    """Faust's producer, idempotent: a send retried after a broker failed is written once.

    Without it a request the dying broker had written already was written again: an alert on the
    alerts topic twice, a changelog record twice.
    """

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    Producer = Producer


class TableManager(faust.tables.TableManager):
    """Faust's table manager, whose changelog queue is still emptied when the flow resumes."""

    @property
    def changelog_queue(self) -> Any:
        if self._changelog_queue is None:
            self._changelog_queue = cast(App, self.app).clearing_flow_control_queue(self.app.conf.stream_buffer_maxsize)
        return self._changelog_queue


class TopicGate(Service):
    """Holds back the producer, consumer and tables until `wait` (run in a thread) returns.

    `wait` gets an event that is set when the worker stops meanwhile. When it raises, `on_error`
    gets the exception (it is expected to stop the worker) and the start waits to be cancelled.
    """

    def __init__(
        self, wait: Callable[[threading.Event], None], on_error: Callable[[Exception], None], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._wait = wait
        self._on_error = on_error

    async def on_start(self) -> None:
        stop = threading.Event()
        try:
            await asyncio.to_thread(self._wait, stop)
        except Exception as exc:
            self._on_error(exc)
            await asyncio.get_running_loop().create_future()  # cancelled by the stop on_error asks for
        finally:
            stop.set()


class GatedBoot(BootStrategy):
    """Faust's start order with the web server first and the app's topic gate before Kafka.

    The worker's health and readiness pages answer while it waits for Kafka and its topics.
    """

    def server(self) -> Iterable[ServiceT]:
        gate = cast(App, self.app).gate
        return self._chain(
            self.sensors(),
            self.web_server(),
            [gate] if gate is not None else [],
            self.kafka_producer(),
            self.kafka_consumer(),
            self.agents(),
            self.kafka_conductor(),
            self.tables(),
        )


class App(faust.App):
    """A Faust app whose consumer uses the cheaper hand-off above and the lean monitor.

    Its channels and streams keep their queued messages when the flow resumes. Faust empties
    them then, but after a rebalance it resumes the partitions and seeks them before it resumes
    the flow, so messages fetched after a seek were dropped and never read again (a takeover
    lost events). Messages of an earlier generation are still skipped by the streams, unacked,
    and read again from the committed offsets. The changelog queue is still emptied: recovery
    seeks its partitions itself and counts on not seeing old events.
    """

    BootStrategy = GatedBoot

    def __init__(self, id: str, **kwargs: Any) -> None:
        kwargs.setdefault("Monitor", LeanMonitor)
        kwargs.setdefault("TableManager", TableManager)
        super().__init__(id, **kwargs)
        self.gate: TopicGate | None = None
        self.batch_topics: frozenset[str] = frozenset()
        self.batch_handler: BatchHandler | None = None

    def take_batches(self, topic: faust.TopicT, handler: BatchHandler) -> None:
        """Subscribe to `topic`, and hand each fetch's records of it to `handler` instead of to streams.

        `handler` returning means the records are processed: they are acked (and committed with
        Faust's next commit). A rebalance or a stop waits for the batch being handled.
        """
        self.batch_topics = frozenset(topic.topics)
        self.batch_handler = handler
        self.topics.add(topic)

    def gate_start(self, wait: Callable[[threading.Event], None], on_error: Callable[[Exception], None]) -> None:
        """Start the producer, consumer and tables only once `wait` returns (see TopicGate)."""
        self.gate = TopicGate(wait, on_error, beacon=self.beacon)

    def FlowControlQueue(self, maxsize: int | None = None, *, clear_on_resume: bool = False) -> Any:
        return super().FlowControlQueue(maxsize, clear_on_resume=False)

    def clearing_flow_control_queue(self, maxsize: int | None = None) -> Any:
        return super().FlowControlQueue(maxsize, clear_on_resume=True)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)


def set_partitions(app: faust.App, table: Any, partitions: int) -> None:
    """Give the table's changelog (and Faust's own internal topics) `partitions` partitions.

    Only effective before the table manager starts, which declares the changelog topic.
    """
    app.conf.topic_partitions = partitions
    table.partitions = partitions
    table.changelog_topic.partitions = partitions


def set_replication(app: faust.App, table: Any, factor: int, min_insync: int) -> None:
    """Give the table's changelog (and Faust's own internal topics) `factor` replicas, and the
    changelog's writes `min_insync` of them before they count. Only effective before the table
    manager starts, which declares the changelog topic."""
    app.conf.topic_replication_factor = factor
    topic = table.changelog_topic
    topic.replicas = factor
    topic.config = {**(topic.config or {}), "min.insync.replicas": str(min_insync)}


def remember_partition(table: Any, key: bytes, partition: int | None) -> None:
    """Tell the memory store which partition a key belongs to (None: the key was deleted), as its
    own changelog reader does, so that it forgets the key when the partition moves to another worker."""
    key_partition = getattr(table.data, "_key_partition", None)
    if key_partition is not None:
        if partition is None:
            key_partition.pop(key, None)
        else:
            key_partition[key] = partition


def key_partitions(table: Any) -> Mapping[bytes, int]:
    """The memory store's key -> partition map: recovered keys and the ones `remember_partition` named."""
    return cast(Mapping[bytes, int], getattr(table.data, "_key_partition", {}))


def kafka_producer(app: faust.App) -> Any:
    """The started app's aiokafka producer (an `AIOKafkaProducer`), under Faust's own producer."""
    return cast(faust_aiokafka.Producer, app.producer)._ensure_producer()


def set_producer_buffer(app: faust.App, max_messages: int) -> None:
    """How many sends may wait in Faust's producer buffer before a stream waits for them."""
    app.producer.buffer.max_messages = max_messages


class FaustWorker(faust.Worker):
    """Faust's worker without the terminal spinner, stoppable from inside, returning its exit status."""

    def __init__(self, app: faust.App, loglevel: str) -> None:
        super().__init__(app, loglevel=loglevel, quiet=True)
        # Faust's terminal spinner, at WARNING and above, sets the root logger to DEBUG so that every
        # record spins it: every library's debug record would then be built (a per-message cost).
        self.spinner = None

    def stop_soon(self) -> None:
        """Stop as SIGTERM does, without saying a signal came."""
        if self._signal_stop_future is None:
            self._signal_stop_future = asyncio.ensure_future(self._stop_and_cancel_start())

    async def _stop_and_cancel_start(self) -> None:
        await self.stop()
        maybe_cancel(self._starting_fut)

    def run(self) -> int:
        """Run until stopped; the exit status Faust chose (non-zero after a crash)."""
        try:
            self.execute_from_commandline()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1


def add_web_middleware(app: faust.App, middleware: Any) -> None:
    """Put an aiohttp middleware in front of every route of the app's web server, Faust's own included.

    Faust's aiohttp driver keeps its `aiohttp.web.Application` as `web_app`; middlewares can be
    added until the server starts.
    """
    app.web.web_app.middlewares.append(middleware)  # type: ignore[attr-defined]
