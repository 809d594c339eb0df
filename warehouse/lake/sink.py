"""The lake sink: analyzed calls and chats from Kafka into the Iceberg tables, exactly once.

Sinks with the same topic prefix form one consumer group and share the partitions. On assignment a
sink starts each partition at the offset the lake's snapshots hold for it (never Kafka's committed
offset, which is only written for operators' lag views). One thread consumes and decodes; a writer
thread commits the closed batches, each as one atomic commit across the batch's tables with the
offsets it covers (see `writer` and `offsets`). Before partitions are revoked the open batch is
committed, so a rebalance re-reads nothing; a crash re-reads from the lake's offsets, and the writer's
rule that a later delivery always wins makes that replay harmless.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from kernel.catalogue import DEAD_LETTER, topic
from kernel.topics import ensure_topics
from warehouse.batching import OpenBatch, consumer_config, take
from warehouse.dead_letters import DeadLetters
from warehouse.lake import offsets
from warehouse.lake.catalog import open_catalog
from warehouse.lake.errors import LakeError
from warehouse.lake.settings import LakeSettings
from warehouse.lake.writer import FamilyRows, LakeWriter
from warehouse.personal_data import PersonalData
from warehouse.schema import FAMILIES

log = logging.getLogger(__name__)


@dataclass
class LakeSinkStats:
    batches: int = 0
    records: int = 0
    rows: int = 0
    dead_letters: int = 0
    replaced: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)


def _family_rows(batch: OpenBatch) -> list[FamilyRows]:
    """The closed batch per family, each with the offsets it covers (a family of dead letters only too)."""
    out = []
    for t, family_batch in batch.families.items():
        offs = {tp: o for tp, o in batch.next_offsets.items() if tp[0] == t}
        if offs:
            out.append(FamilyRows(family_batch.family, family_batch.tables(), offs))
    return out


@dataclass
class _Drained:
    """Queued behind the batches: set once the writer has committed everything before it."""

    done: threading.Event = field(default_factory=threading.Event)


class LakeSink:
    def __init__(self, settings: LakeSettings, say: Callable[[str], None] = log.info) -> None:
        self.cfg = settings
        self.say = say
        self.families = {topic(settings.topic_prefix, f.topic_suffix): f for f in FAMILIES}
        self.catalog = open_catalog(settings)
        self.writer = LakeWriter(self.catalog, settings.lake_commit_attempts, settings.lake_key_cache_rows)
        self.personal = PersonalData.from_settings(settings)
        self.stats = LakeSinkStats()
        self.consumer = Consumer(
            {
                **consumer_config(settings.kafka_bootstrap, f"{settings.lake_group_id}-{settings.topic_prefix}", 16384),
                # A sink that died gives its partitions to the others after this long.
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 2000,
                **({"group.instance.id": settings.lake_instance_id} if settings.lake_instance_id else {}),
            }
        )
        self.dead_letters = DeadLetters(settings.kafka_bootstrap, topic(settings.topic_prefix, DEAD_LETTER))
        self._stop = threading.Event()
        self._queue: queue.Queue[list[FamilyRows] | _Drained | None] = queue.Queue(maxsize=1)
        self._writer_error: BaseException | None = None
        self._pending: OpenBatch | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._high: dict[tuple[str, int], int] = {}
        self._consumed: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._committed: dict[tuple[str, int], int] = {}
        self._told_kafka: dict[tuple[str, int], int] = {}
        self._writer: threading.Thread | None = None

    # -- partitions ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        tables = self.catalog.load_tables([f.parent.name for f in self.families.values()])
        stored: offsets.Offsets = {}
        for t, family in self.families.items():
            stored |= offsets.stored(tables[family.parent.name].metadata, [t])
        for tp in parts:
            key = (tp.topic, tp.partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=15)
            start = max(stored.get(key, low), low)
            tp.offset = start
            self._high[key] = high
            self._consumed[key] = start
            self._assigned.add(key)
        consumer.assign(parts)
        log.info(
            "lake sink assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in parts) or "nothing"
        )

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        """Commit what was read of the partitions before another sink takes them."""
        if self._writer is not None and self._writer.is_alive() and self._writer_error is None:
            self._close_pending()
            self._drain()
            self._tell_kafka()
        self._assigned.clear()
        self._high.clear()

    def _on_lost(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        """The group gave the partitions away already: what is read of them is left to their new owner."""
        log.warning("lake sink lost %d partitions to the group; dropping the open batch", len(parts))
        self._pending = None
        self._assigned.clear()
        self._high.clear()

    def caught_up(self) -> bool:
        """Every assigned partition is read up to the end it had when it was assigned."""
        if not self._assigned:
            return False
        # A transaction's marker takes an offset but is no message: the consumer's position counts it.
        behind = [
            TopicPartition(t, p) for t, p in self._assigned if self._consumed.get((t, p), 0) < self._high.get((t, p), 0)
        ]
        return not behind or all(
            tp.offset >= self._high.get((tp.topic, tp.partition), 0) for tp in self.consumer.position(behind)
        )

    # -- loading -------------------------------------------------------------------------------

    def _add(self, msg: Message) -> None:
        if self._pending is None:
            self._pending = OpenBatch(self.families, self.cfg.lake_batch_max_seconds, self.personal)
        t, p, next_offset = self._pending.add(msg, self.dead_letters)
        self._consumed[(t, p)] = next_offset
        self.stats.dead_letters = self.dead_letters.count

    def _close_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.dead_letters.confirm()
        self._hand_over(_family_rows(pending))

    def _due(self) -> bool:
        p = self._pending
        return p is not None and p.due(self.cfg.lake_batch_max_records, self.cfg.lake_batch_max_bytes)

    # -- the writer thread ---------------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, _Drained):
                    item.done.set()
                    continue
                t0 = time.monotonic()
                stats = self.writer.commit(item)
                log.debug(
                    "lake: committed %d rows in %.2fs (%d attempts)",
                    sum(stats.rows.values()),
                    time.monotonic() - t0,
                    stats.attempts,
                )
                with self._lock:
                    for fr in item:
                        self._committed.update(fr.offsets)
                self.stats.batches += 1
                self.stats.rows += sum(stats.rows.values())
                self.stats.replaced += stats.replaced
                self.stats.retries += stats.attempts - 1
        except BaseException as exc:  # the consuming thread stops with it
            log.exception("committing a batch to the lake failed")
            self._writer_error = exc

    def _check_writer(self) -> None:
        if self._writer_error is not None:
            raise LakeError(f"writing to the lake failed: {self._writer_error}") from self._writer_error

    def _hand_over(self, item: list[FamilyRows] | _Drained | None) -> None:
        while True:
            self._check_writer()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _drain(self) -> None:
        """Wait until the writer has committed every batch handed over so far."""
        marker = _Drained()
        self._hand_over(marker)
        while not marker.done.wait(0.2):
            self._check_writer()

    def _tell_kafka(self) -> None:
        """Kafka's committed offsets follow the lake's (for lag views only; the lake's are what count)."""
        with self._lock:
            todo = {
                tp: o for tp, o in self._committed.items() if self._told_kafka.get(tp) != o and tp in self._assigned
            }
        if todo:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()], asynchronous=True)
            self._told_kafka.update(todo)

    # -- main loop -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        want = max(1, min(500, self.cfg.lake_batch_max_records - (self._pending.records if self._pending else 0)))
        for msg in take(self.consumer, want, 0.2 if self._pending is None else 0.02):
            self.stats.records += 1
            self._add(msg)

    def run(self, until_caught_up: bool = False) -> LakeSinkStats:
        writer = self._writer = threading.Thread(target=self._write_loop, name="lake-writer", daemon=True)
        try:
            cfg = self.cfg
            ensure_topics(cfg.kafka_bootstrap, cfg.topic_prefix, cfg.topic_partitions, replication=cfg.replication())
            writer.start()
            self.consumer.subscribe(
                list(self.families), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            self.say(f"sink: loading {', '.join(self.families)} into the lake ({self.cfg.describe()})")
            log.info("personal data: %s", self.personal.describe())
            while not self._stop.is_set():
                self._check_writer()
                self._poll()
                if until_caught_up and self.caught_up():
                    break
                if self._due():
                    self._close_pending()
                self._tell_kafka()
            self._close_pending()
            self._drain()
            self._tell_kafka()
        except KafkaException as exc:
            raise LakeError(f"Kafka at {self.cfg.kafka_bootstrap}: {exc}") from exc
        finally:
            while writer.is_alive():
                try:
                    self._queue.put(None, timeout=0.2)
                    writer.join()
                except queue.Full:
                    continue
            self.close()
        return self.stats

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            self.dead_letters.close()
            self.catalog.engine.dispose()


def run_lake_sink(settings: LakeSettings, until_caught_up: bool = False) -> LakeSinkStats:
    sink = LakeSink(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sink.stop())
    stats = sink.run(until_caught_up=until_caught_up)
    log.info("lake sink stopped: %d records, %d rows, %d dead letters", stats.records, stats.rows, stats.dead_letters)
    return stats
