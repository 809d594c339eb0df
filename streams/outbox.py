"""Per-call alerts delivered once: from the committed state, after the batch that raised them is durable.

The processor writes every alert it raises as an outbox entry, `a:<p>:<alert id>`, in the same
commit as the call state that remembers it was raised, so a batch processed again after a crash
raises nothing twice. The outbox delivers an entry only once its batch's changelog writes are
acknowledged: it publishes the alert to `<prefix>.alerts` (and waits for the broker), posts it to
the alert routes (until the sender is done with it), then deletes the entry with a tombstone. A
batch's entries of one partition are published at once; each posted one is deleted as soon as its
POST is done, the others in one write.

After a crash or a rebalance, the worker that owns a partition finds its entries in the recovered
table. Any of them may have been published already: their ids are looked up on the alerts topic
(from a minute before they were raised) and only the missing ones are published. Every one is
posted, since a webhook cannot be asked what it got; the only alert a receiver can see twice is one
posted in the moment before a SIGKILL, before its tombstone reached Kafka (each post carries the
alert id as `Idempotency-Key`). Per-call alerts only: the failure-rate rule's alerts are throttled
from the alerts topic itself, so a restarted worker never raises one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from confluent_kafka import Consumer, KafkaException, TopicPartition

from streams.processor import Alert, decode_pending, outbox_prefix

log = logging.getLogger(__name__)

# How far before an entry was raised a look for it on the alerts topic starts (clocks of hosts differ).
_LOOK_BACK_MS = 60_000
# Recently delivered entries, remembered so that a recovery replaying the changelog from before their
# tombstone does not deliver them again.
_REMEMBER = 10_000


class OutboxStore(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]: ...

    async def write_now(self, partition: int, key: bytes, value: bytes | None) -> asyncio.Future[Any]: ...

    async def delete_now(self, partition: int, keys: list[bytes]) -> asyncio.Future[Any]:
        """Delete the keys and send their tombstones to the changelog at once; the future of the last."""


class Poster(Protocol):
    """The alert routes' sender: `submit` never blocks; `on_done(alert)` is called once it is done with one."""

    on_done: Callable[[Alert], None] | None

    def posts(self, alert: Alert) -> bool: ...

    def submit(self, alert: Alert) -> None: ...


@dataclass
class _Entry:
    partition: int
    key: bytes
    alert: Alert
    published: bool = False
    task: asyncio.Future[None] | None = None


class OutboxStats(msgspec.Struct):
    pending: int  # entries being delivered by this worker
    delivered: int  # entries delivered and deleted (tombstone acknowledged) by this worker
    recovered: int  # entries found after a recovery
    already_published: int  # of those, found on the alerts topic already


class Outbox:
    """Delivers the outbox entries of the partitions this worker owns."""

    def __init__(
        self,
        store: OutboxStore,
        publish: Callable[[list[Alert]], Awaitable[None]],
        poster: Poster,
        published_since: Callable[[int], set[str]],
    ) -> None:
        self.store = store
        self.publish = publish  # puts alerts on the alerts topic and waits until the broker has them all
        self.poster = poster
        self.published_since = published_since  # ids on the alerts topic since a unix ms (blocking)
        poster.on_done = self._posted
        self._entries: dict[bytes, _Entry] = {}
        self._posting: dict[str, asyncio.Future[None]] = {}
        self._done: OrderedDict[bytes, None] = OrderedDict()
        self._tasks: set[asyncio.Future[None]] = set()
        self.delivered = 0
        self.recovered_n = 0
        self.already_published = 0

    def stats(self) -> OutboxStats:
        return OutboxStats(len(self._entries), self.delivered, self.recovered_n, self.already_published)

    def committed(self, partition: int, alerts: Iterable[Alert], written: Awaitable[Any] | None) -> None:
        """Deliver the alerts of a batch once `written` (its partition's last changelog write) is acknowledged."""
        entries = [self._entry(partition, alert) for alert in alerts]
        if entries:
            self._spawn(self._after(written, entries))

    async def recovered(self, partitions: Iterable[int]) -> None:
        """After a recovery: stop delivering for partitions no longer owned, deliver what the owned
        ones hold that this worker is not delivering already."""
        owned = set(partitions)
        for key, entry in list(self._entries.items()):
            if entry.partition not in owned:
                self._entries.pop(key)
                if entry.task is not None:
                    entry.task.cancel()
        found: list[tuple[_Entry, int]] = []
        for partition in owned:
            for key in list(self.store.keys_with_prefix(outbox_prefix(partition))):
                if key in self._entries:
                    continue
                if key in self._done:  # delivered, and brought back by a replay from before its tombstone
                    await self.store.write_now(partition, key, None)
                    continue
                raw = self.store.get(key)
                if raw is not None:
                    pending = decode_pending(raw)
                    found.append((self._entry(partition, pending.alert, key), pending.raised))
        if found:
            self.recovered_n += len(found)
            self._spawn(self._check_then_deliver(found))

    def _entry(self, partition: int, alert: Alert, key: bytes | None = None) -> _Entry:
        entry = _Entry(partition, key or outbox_prefix(partition) + alert.id.encode(), alert)
        self._entries[entry.key] = entry
        return entry

    async def _after(self, written: Awaitable[Any] | None, entries: list[_Entry]) -> None:
        try:
            if written is not None:
                await written
        except Exception as exc:  # the worker stops on a failed changelog write (TableStore)
            log.error("alerts not delivered: their batch's changelog write failed: %s", exc)
            return
        self._start(entries)

    async def _check_then_deliver(self, found: list[tuple[_Entry, int]]) -> None:
        since = min(raised for _, raised in found) - _LOOK_BACK_MS
        try:
            on_topic = await asyncio.to_thread(self.published_since, since)
        except Exception as exc:  # publishing again beats losing them
            log.warning("could not read the alerts topic to check %d recovered alerts: %s", len(found), exc)
            on_topic = set()
        for entry, _ in found:
            entry.published = entry.alert.id in on_topic
            self.already_published += entry.published
        self._start([entry for entry, _ in found if self._entries.get(entry.key) is entry])

    def _start(self, entries: list[_Entry]) -> None:
        """Deliver `entries`, one task per partition (a rebalance cancels a partition's)."""
        by_partition: dict[int, list[_Entry]] = {}
        for entry in entries:
            by_partition.setdefault(entry.partition, []).append(entry)
        for partition, group in by_partition.items():
            task = self._spawn(self._deliver(partition, group))
            for entry in group:
                entry.task = task

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _deliver(self, partition: int, entries: list[_Entry]) -> None:
        """Publish what is not on the alerts topic yet (at once), then settle the entries: those no
        route takes are deleted in one write, each posted one as soon as the sender is done with it
        (so a crash can repost only an alert whose POST had just ended, never one of a slower group)."""
        try:
            unpublished = [entry for entry in entries if not entry.published]
            if unpublished:
                await self.publish([entry.alert for entry in unpublished])
                for entry in unpublished:
                    entry.published = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(partition, entries, exc)
            return
        posted = [entry for entry in entries if self.poster.posts(entry.alert)]
        quiet = [entry for entry in entries if entry not in posted]
        await asyncio.gather(
            *([self._settle(partition, quiet, post=False)] if quiet else []),
            *(self._settle(partition, [entry], post=True) for entry in posted),
        )

    async def _settle(self, partition: int, entries: list[_Entry], post: bool) -> None:
        """Post (`post`: one entry) until the sender is done with it, then delete the entries."""
        alert = entries[0].alert
        try:
            if post:
                done = self._posting[alert.id] = asyncio.get_running_loop().create_future()
                self.poster.submit(alert)
                await done
            written = await self.store.delete_now(partition, [entry.key for entry in entries])
            for entry in entries:
                self._remember(entry.key)
            await written
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(partition, entries, exc)
            return
        finally:
            if post:
                self._posting.pop(alert.id, None)
        for entry in entries:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
        self.delivered += len(entries)

    def _failed(self, partition: int, entries: list[_Entry], exc: Exception) -> None:
        log.error(
            "%d alerts (%s) not delivered: %s; the next recovery of partition %d retries them",
            len(entries),
            entries[0].alert.id,
            exc,
            partition,
        )

    def _posted(self, alert: Alert) -> None:
        fut = self._posting.get(alert.id)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _remember(self, key: bytes) -> None:
        self._done[key] = None
        while len(self._done) > _REMEMBER:
            self._done.popitem(last=False)


def ids_on_topic(bootstrap: str, topic: str, since_ms: int, timeout: float = 10.0) -> set[str]:
    """The ids of the alerts on `topic` published since `since_ms` (unix ms), up to its current end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"alert-check-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            raise KafkaException(f"topic {topic} is not readable")
        wanted = [TopicPartition(topic, p, since_ms) for p in meta.partitions]
        starts = consumer.offsets_for_times(wanted, timeout=timeout)
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=timeout)[1] for tp in wanted}
        todo = [tp for tp in starts if tp.offset >= 0 and tp.offset < ends[tp.partition]]
        return _read_ids(consumer, todo, ends)
    finally:
        with contextlib.suppress(Exception):
            consumer.close()


_dec_id = msgspec.json.Decoder(dict[str, Any])


def _read_ids(consumer: Consumer, todo: list[TopicPartition], ends: dict[int, int]) -> set[str]:
    ids: set[str] = set()
    if not todo:
        return ids
    consumer.assign(todo)
    left = {tp.partition for tp in todo}
    deadline = time.monotonic() + 60
    while left:
        if time.monotonic() > deadline:
            raise KafkaException(
                f"reading the alerts topic up to its end took over 60 s (partitions {sorted(left)} left)"
            )
        for message in consumer.consume(num_messages=500, timeout=1.0):
            if message.error() is not None:
                continue
            partition, offset = message.partition() or 0, message.offset() or 0
            with contextlib.suppress(msgspec.DecodeError):
                alert_id = _dec_id.decode(message.value() or b"{}").get("id")
                if isinstance(alert_id, str):
                    ids.add(alert_id)
            if offset + 1 >= ends[partition]:
                left.discard(partition)
    return ids
