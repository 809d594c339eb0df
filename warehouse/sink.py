"""`callstream sink`: analyzed calls and chats from Kafka into DuckDB and Parquet, exactly once.

The rows of a batch and the Kafka offsets they came from are committed in one DuckDB transaction,
and at start the consumer is assigned every partition at the offsets stored there, so a crash at any
moment neither loses a batch nor loads it twice. A repeated delivery of a call replaces its row and
all of its child rows. Partitions are assigned, not subscribed: there is one writer per DuckDB file
anyway, and a restart after a crash does not wait for a consumer-group session to time out.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from callstream.catalogue import DEAD_LETTER, Header, topic
from callstream.topics import ensure_topics
from warehouse.db import run, scalar
from warehouse.errors import RecordError, WarehouseError
from warehouse.parquet import ParquetPublisher, current_snapshot
from warehouse.records import FamilyBatch, Source
from warehouse.schema import FAMILIES, TABLES, Family, create_all
from warehouse.settings import SinkSettings

log = logging.getLogger(__name__)


@dataclass
class SinkStats:
    batches: int = 0
    records: int = 0
    rows: int = 0
    dead_letters: int = 0
    started: float = field(default_factory=time.monotonic)


def _header(msg: Message, name: str) -> bytes | None:
    headers: Any = msg.headers() or []
    for k, v in headers:
        if k == name:
            return v if isinstance(v, bytes) else None
    return None


def _received_ms(msg: Message) -> int | None:
    raw = _header(msg, Header.RECEIVED_AT)
    if raw:
        try:
            return int(raw)
        except ValueError:
            pass
    kind, ts = msg.timestamp()
    return ts if kind and ts > 0 else None


class Sink:
    def __init__(self, settings: SinkSettings, say: Callable[[str], None] = log.info) -> None:
        self.cfg = settings
        self.say = say
        self.families: dict[str, Family] = {topic(settings.topic_prefix, f.topic_suffix): f for f in FAMILIES}
        self.topics = list(self.families)
        self.dead_letter_topic = topic(settings.topic_prefix, DEAD_LETTER)
        Path(settings.warehouse).parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(settings.warehouse, config={
            "memory_limit": settings.duckdb_memory_limit, "threads": settings.duckdb_threads,
            "preserve_insertion_order": False,
        })
        create_all(self.con)
        self.status_path = status_path(settings.warehouse)
        self.stats = SinkStats()
        self._stop = threading.Event()
        self._high: dict[tuple[str, int], int] = {}
        # Load sequence numbers only grow, across restarts too (they name the Parquet parts).
        self._seq = max(int(scalar(self.con, f"SELECT coalesce(max(_load_seq), 0) FROM {t.name}") or 0) for t in TABLES)
        self._seq = max(self._seq, int(scalar(self.con, "SELECT coalesce(max(seq), 0) FROM _callstream_dirty") or 0))
        self._cleaned_seq = 0
        self._status_at = 0.0
        self.publisher = ParquetPublisher(self.con, Path(settings.parquet_dir),
                                          min_interval=settings.parquet_min_interval_seconds,
                                          retention_seconds=settings.snapshot_retention_seconds,
                                          compression=settings.parquet_compression)
        published = self.publisher.published_seq()
        if published > self._seq:
            raise WarehouseError(
                f"the Parquet folder {settings.parquet_dir} holds loads up to {published}, but {settings.warehouse} "
                f"only up to {self._seq}: it was written from another database. Move it away (the sink rewrites "
                "it from the database) or set CALLSTREAM_PARQUET_DIR to another folder."
            )
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.group_id}-{settings.topic_prefix}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 16 * 1024 * 1024,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            "queued.max.messages.kbytes": settings.fetch_queue_kbytes,
        })
        self._dlq: Producer | None = None

    # -- offsets -------------------------------------------------------------------------------

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        rows = run(self.con, "SELECT topic, kafka_partition, next_offset FROM _callstream_offsets")
        return {(t, p): o for t, p, o in rows}

    def _assign(self) -> None:
        ensure_topics(self.cfg.kafka_bootstrap, self.cfg.topic_prefix, partitions=self.cfg.topic_partitions)
        stored = self.stored_offsets()
        try:
            meta = self.consumer.list_topics(timeout=15)
        except KafkaException as exc:
            raise WarehouseError(f"cannot reach Kafka at {self.cfg.kafka_bootstrap}: {exc}") from exc
        parts: list[TopicPartition] = []
        for t in self.topics:
            tmeta = meta.topics.get(t)
            if tmeta is None or tmeta.error is not None:
                raise WarehouseError(f"topic {t} is missing on {self.cfg.kafka_bootstrap}")
            for p in sorted(tmeta.partitions):
                parts.append(TopicPartition(t, p, stored.get((t, p), OFFSET_BEGINNING)))
        for tp in parts:
            _, high = self.consumer.get_watermark_offsets(tp, timeout=15)
            self._high[(tp.topic, tp.partition)] = high
        self.consumer.assign(parts)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in parts))

    # -- loading -------------------------------------------------------------------------------

    def _dead_letter(self, msg: Message, reason: str) -> None:
        if self._dlq is None:
            self._dlq = Producer({"bootstrap.servers": self.cfg.kafka_bootstrap, "enable.idempotence": True})
        headers = [(Header.REASON, reason.encode()), ("source_topic", str(msg.topic()).encode()),
                   ("source_partition", str(msg.partition()).encode()),
                   ("source_offset", str(msg.offset()).encode())]
        self._dlq.produce(self.dead_letter_topic, value=msg.value(), key=msg.key(),
                          headers=[*(msg.headers() or []), *headers])
        self.stats.dead_letters += 1
        log.warning("dead-lettered %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason)

    def load(self, msgs: list[Message]) -> int:
        """Load one batch and its offsets in one transaction; return the rows written."""
        batches = {t: FamilyBatch(f) for t, f in self.families.items()}
        next_offsets: dict[tuple[str, int], int] = {}
        now_ms = int(time.time() * 1000)
        for msg in msgs:
            t, p, o = str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)
            next_offsets[(t, p)] = o + 1
            try:
                value = msg.value()
                if not value:
                    raise RecordError("the message has no value")
                batches[t].add(value, Source(p, o, _received_ms(msg), now_ms))
            except RecordError as exc:
                self._dead_letter(msg, str(exc))
        if self._dlq is not None and self._dlq.flush(30) > 0:
            raise WarehouseError("the dead-letter topic did not acknowledge; not committing this batch")
        if self.publisher.error is not None:
            raise WarehouseError(f"publishing Parquet failed: {self.publisher.error}") from self.publisher.error
        tables = {t: b.tables() for t, b in batches.items() if len(b)}
        self._seq += 1
        con = self.con
        rows = 0
        run(con, "BEGIN TRANSACTION")
        try:
            for t, family_tables in tables.items():
                rows += replace_rows(con, self.families[t], family_tables, self._seq)
            done = self.publisher.done_seq
            if done > self._cleaned_seq:
                run(con, "DELETE FROM _callstream_dirty WHERE seq <= ?", [done])
            con.executemany(
                "INSERT OR REPLACE INTO _callstream_offsets VALUES (?, ?, ?, ?)",
                [(t, p, o, datetime.now(UTC).replace(tzinfo=None)) for (t, p), o in next_offsets.items()],
            )
            run(con, "COMMIT")
        except BaseException:
            run(con, "ROLLBACK")
            raise
        self._cleaned_seq = max(self._cleaned_seq, done)
        if tables:
            self.publisher.poke()
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()], asynchronous=True
        )
        self.stats.batches += 1
        self.stats.records += len(msgs)
        self.stats.rows += rows
        self._write_status()
        return rows

    def _cleanup_dirty(self) -> None:
        """While idle: forget dirty days the publisher has written (a busy sink does it per batch)."""
        done = self.publisher.done_seq
        if done > self._cleaned_seq:
            run(self.con, "DELETE FROM _callstream_dirty WHERE seq <= ?", [done])
            self._cleaned_seq = done

    def _write_status(self, force: bool = False) -> None:
        """A small JSON beside the database, for readers that cannot open it while we hold the lock."""
        if not force and time.monotonic() - self._status_at < 1.0:
            return
        self._status_at = time.monotonic()
        counts = {t.name: scalar(self.con, f"SELECT count(*) FROM {t.name}") for t in TABLES}
        snap = current_snapshot(Path(self.cfg.parquet_dir))
        status = {"warehouse": str(Path(self.cfg.warehouse).resolve()), "tables": counts,
                  "records": self.stats.records, "dead_letters": self.stats.dead_letters,
                  "parquet_dir": str(Path(self.cfg.parquet_dir).resolve()),
                  "parquet_snapshot": snap.name if snap else None,
                  "updated_at": datetime.now(UTC).isoformat()}
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(status))
        tmp.replace(self.status_path)

    def caught_up(self) -> bool:
        """Every partition has been loaded up to the end it had when the sink started."""
        stored = self.stored_offsets()
        return all(stored.get(tp, 0) >= high for tp, high in self._high.items())

    def stop(self) -> None:
        self._stop.set()

    def run(self, until_caught_up: bool = False) -> SinkStats:
        """Consume and load until stopped (or, with `until_caught_up`, until the topics are loaded)."""
        try:
            self._assign()
            self.publisher.start()
            self.say(f"sink: loading {', '.join(self.topics)} into {self.cfg.warehouse} and {self.cfg.parquet_dir}")
            pending: list[Message] = []
            pending_bytes = 0
            deadline = time.monotonic() + self.cfg.batch_max_seconds
            while not self._stop.is_set():
                want = max(1, min(500, self.cfg.batch_max_records - len(pending)))
                # consume() waits for `want` messages until the timeout: take what is there at once,
                # and wait only when there is nothing at all.
                got = self.consumer.consume(num_messages=want, timeout=0)
                if not got and not pending:
                    got = self.consumer.consume(num_messages=want, timeout=0.2)
                elif not got:
                    got = self.consumer.consume(num_messages=want, timeout=0.02)
                for msg in got:
                    err = msg.error()
                    if err is None:
                        pending.append(msg)
                        pending_bytes += len(msg.value() or b"")
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.error("consumer error: %s", err)
                full = len(pending) >= self.cfg.batch_max_records or pending_bytes >= self.cfg.batch_max_bytes
                if pending and (full or time.monotonic() >= deadline):
                    self.load(pending)
                    pending, pending_bytes = [], 0
                    deadline = time.monotonic() + self.cfg.batch_max_seconds
                elif not pending:
                    deadline = time.monotonic() + self.cfg.batch_max_seconds
                    self._cleanup_dirty()
                    self._write_status()
                    if until_caught_up and self.caught_up():
                        break
                if self.publisher.error is not None:
                    raise WarehouseError(f"publishing Parquet failed: {self.publisher.error}")
            if pending:
                self.load(pending)
            self.publisher.stop(final=True)
            self._cleanup_dirty()
            self._write_status(force=True)
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        try:
            self.publisher.stop(final=False)
            self.consumer.close()
        finally:
            self.con.close()
            if self._dlq is not None:
                self._dlq.flush(10)


def replace_rows(con: duckdb.DuckDBPyConnection, family: Family, tables: dict[str, pa.Table], seq: int) -> int:
    """In the caller's transaction: delete the stored versions of the batch's keys (parent and
    children), insert the new rows with load sequence `seq`, and note the replaced rows' Parquet parts."""
    parent, key = family.parent, family.parent.parent_key
    con.register("_batch_keys", tables[parent.name].select([key, "day"]))
    try:
        replaced = scalar(
            con,
            f"INSERT INTO _callstream_dirty SELECT DISTINCT ?, p.day, p._load_seq, ? "
            f"FROM {parent.name} p SEMI JOIN _batch_keys b ON p.{key} = b.{key}",
            [family.name, seq],
        )
        if replaced:
            for t in (*family.children, parent):
                run(con, f"DELETE FROM {t.name} WHERE {key} IN (SELECT {key} FROM _batch_keys)")
    finally:
        con.unregister("_batch_keys")
    rows = 0
    for t in family.tables:
        data = tables[t.name]
        if data.num_rows:
            con.register("_batch_rows", data)
            try:
                run(con, f"INSERT INTO {t.name} SELECT *, {int(seq)} FROM _batch_rows")
            finally:
                con.unregister("_batch_rows")
            rows += data.num_rows
    return rows


def status_path(warehouse: str) -> Path:
    """Where the sink publishes its row counts after every commit."""
    return Path(warehouse).with_suffix(".status.json")


def run_sink(settings: SinkSettings, until_caught_up: bool = False) -> SinkStats:
    # Arrow's default allocator keeps freed batches' memory; malloc gives it back (and the sink's
    # peak RSS stays lower at the same speed).
    pa.set_memory_pool(pa.system_memory_pool())
    sink = Sink(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sink.stop())
    stats = sink.run(until_caught_up=until_caught_up)
    log.info("sink stopped: %d records, %d rows, %d dead letters", stats.records, stats.rows, stats.dead_letters)
    return stats
