"""`callstream sink`: analyzed calls and chats from Kafka into DuckDB and Parquet, exactly once.

The rows of a batch and the Kafka offsets they came from are committed in one DuckDB transaction,
and at start the consumer is assigned every partition at the offsets stored there, so a crash at any
moment neither loses a batch nor loads it twice. A repeated delivery of a call replaces its row and
all of its child rows. Partitions are assigned, not subscribed: there is one writer per DuckDB file
anyway, and a restart after a crash does not wait for a consumer-group session to time out.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
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
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from kernel.catalogue import DEAD_LETTER, Header, topic
from kernel.topics import ensure_topics
from warehouse import ledger
from warehouse.db import insert_rows, run, scalar, transaction
from warehouse.errors import RecordError, WarehouseError
from warehouse.metrics import sink_metrics
from warehouse.migrations import create_all
from warehouse.parquet import ParquetPublisher, current_snapshot
from warehouse.records import FamilyBatch, Source
from warehouse.schema import FAMILIES, TABLES, Family, last_load_seq
from warehouse.settings import SinkSettings

log = logging.getLogger(__name__)


@dataclass
class SinkStats:
    batches: int = 0
    records: int = 0
    rows: int = 0
    dead_letters: int = 0
    started: float = field(default_factory=time.monotonic)


class _Pending:
    """The open batch: records decoded since the last batch was closed, and the offsets after them."""

    def __init__(self, families: dict[str, Family], max_seconds: float) -> None:
        self.batches = {t: FamilyBatch(f) for t, f in families.items()}
        self.first_offsets: dict[tuple[str, int], int] = {}
        self.next_offsets: dict[tuple[str, int], int] = {}
        self.records = 0
        self.bytes = 0
        self.loaded_at_ms = int(time.time() * 1000)
        self.deadline = time.monotonic() + max_seconds


@dataclass(frozen=True, slots=True)
class _Batch:
    """A closed batch, ready to write: Arrow tables per topic, and per partition the offsets of its
    first record and after its last."""

    tables: dict[str, dict[str, pa.Table]]
    first_offsets: dict[tuple[str, int], int]
    next_offsets: dict[tuple[str, int], int]
    records: int


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
        self.con = duckdb.connect(
            settings.warehouse,
            config={
                "memory_limit": settings.duckdb_memory_limit,
                "threads": settings.duckdb_threads,
                "preserve_insertion_order": False,
            },
        )
        create_all(self.con)
        self.status_path = status_path(settings.warehouse)
        self.stats = SinkStats()
        self._stop = threading.Event()
        self._high: dict[tuple[str, int], int] = {}
        # Load sequence numbers only grow, across restarts too (they name the Parquet parts).
        self._seq = max(
            last_load_seq(self.con, TABLES),
            ledger.last_seq(self.con),
            int(scalar(self.con, "SELECT coalesce(max(seq), 0) FROM _callstream_dirty") or 0),
        )
        self._cleaned_seq = 0
        self._status_at = 0.0
        self.publisher = ParquetPublisher(
            self.con,
            Path(settings.parquet_dir),
            min_interval=settings.parquet_min_interval_seconds,
            retention_seconds=settings.snapshot_retention_seconds,
            compression=settings.parquet_compression,
        )
        published = self.publisher.published_seq()
        if published > self._seq:
            raise WarehouseError(
                f"the Parquet folder {settings.parquet_dir} holds loads up to {published}, but {settings.warehouse} "
                f"only up to {self._seq}: it was written from another database. Move it away (the sink rewrites "
                "it from the database) or set CALLSTREAM_PARQUET_DIR to another folder."
            )
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"{settings.group_id}-{settings.topic_prefix}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                # Fetch buffers stay allocated while any message from them lives, and librdkafka holds
                # several: 4 MB fetches keep its memory near the queue size (16 MB fetches cost ~100 MB
                # more RSS), and a loopback broker answers them faster than the sink decodes.
                "fetch.max.bytes": 4 * 1024 * 1024,
                "max.partition.fetch.bytes": 2 * 1024 * 1024,
                "queued.max.messages.kbytes": settings.fetch_queue_kbytes,
                # Once the queue is full librdkafka waits this long before fetching again (default 1 s,
                # which left the sink waiting for messages a third of the time).
                "fetch.queue.backoff.ms": 10,
            }
        )
        self._dlq: Producer | None = None
        # Between the consuming thread and the writer thread (see run()).
        self._queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=1)
        self._writer_stop = threading.Event()
        self._writer_error: BaseException | None = None
        self._committed_lock = threading.Lock()
        self._committed: dict[tuple[str, int], int] = {}  # next offsets committed in DuckDB
        self._kafka_committed: dict[tuple[str, int], int] = {}
        self._consumed: dict[tuple[str, int], int] = {}  # next offsets read (this thread only)

    # -- offsets -------------------------------------------------------------------------------

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        rows = run(self.con, "SELECT topic, kafka_partition, next_offset FROM _callstream_offsets")
        return {(t, p): o for t, p, o in rows}

    def _low_watermark(self, t: str, p: int) -> int:
        return int(self.consumer.get_watermark_offsets(TopicPartition(t, p), timeout=15)[0])

    def _assign(self) -> None:
        ensure_topics(self.cfg.kafka_bootstrap, self.cfg.topic_prefix, partitions=self.cfg.topic_partitions)
        if ledger.verify_and_repair(self.con, self._seq, self._low_watermark):
            self.say(
                "sink: the warehouse differed from its load ledger after a restart; reloading those loads "
                "from Kafka (see the warning above)"
            )
        stored = self.stored_offsets()
        with self._committed_lock:
            self._committed = dict(stored)
            self._kafka_committed = dict(stored)
        self._consumed = dict(stored)
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
                low, high = self.consumer.get_watermark_offsets(TopicPartition(t, p), timeout=15)
                self._high[(t, p)] = high
                # An actual offset rather than OFFSET_BEGINNING spares the first fetch a lookup
                # (about half a second); if retention moves past it, auto.offset.reset applies.
                parts.append(TopicPartition(t, p, stored.get((t, p), low)))
        self.consumer.assign(parts)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in parts))

    # -- loading -------------------------------------------------------------------------------

    def _dead_letter(self, msg: Message, reason: str) -> None:
        if self._dlq is None:
            self._dlq = Producer({"bootstrap.servers": self.cfg.kafka_bootstrap, "enable.idempotence": True})
        headers = [
            (Header.REASON, reason.encode()),
            ("source_topic", str(msg.topic()).encode()),
            ("source_partition", str(msg.partition()).encode()),
            ("source_offset", str(msg.offset()).encode()),
        ]
        self._dlq.produce(
            self.dead_letter_topic, value=msg.value(), key=msg.key(), headers=[*(msg.headers() or []), *headers]
        )
        self.stats.dead_letters += 1
        log.warning("dead-lettered %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason)

    def _add(self, pending: _Pending, msg: Message) -> None:
        """Decode one message into the open batch (or dead-letter it); the message is dropped after."""
        t, p, o = str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)
        pending.first_offsets.setdefault((t, p), o)
        pending.next_offsets[(t, p)] = o + 1
        self._consumed[(t, p)] = o + 1
        pending.records += 1
        value = msg.value()
        pending.bytes += len(value or b"")
        try:
            if not value:
                raise RecordError("the message has no value")
            pending.batches[t].add(value, Source(p, o, _received_ms(msg), pending.loaded_at_ms))
        except RecordError as exc:
            self._dead_letter(msg, str(exc))

    def _close_batch(self, pending: _Pending) -> _Batch:
        """The open batch's Arrow tables, once its dead letters are acknowledged."""
        if self._dlq is not None and self._dlq.flush(30) > 0:
            raise WarehouseError("the dead-letter topic did not acknowledge; not committing this batch")
        tables = {t: b.tables() for t, b in pending.batches.items() if len(b)}
        return _Batch(tables, pending.first_offsets, pending.next_offsets, pending.records)

    def _write(self, batch: _Batch) -> int:
        """Write one batch and its offsets in one transaction; return the rows written."""
        self._check_publisher()
        self._seq += 1
        done = self.publisher.done_seq
        rows = sum(
            write_batch(
                self.con, self.families, batch, self._seq, published=done if done > self._cleaned_seq else 0
            ).values()
        )
        self._cleaned_seq = max(self._cleaned_seq, done)
        if batch.tables:
            self.publisher.poke()
        with self._committed_lock:
            self._committed.update(batch.next_offsets)
        self.stats.batches += 1
        self.stats.records += batch.records
        self.stats.rows += rows
        self._write_status()
        return rows

    def _writer(self) -> None:
        """The writer thread: batches into DuckDB in the order they were closed; idle upkeep between."""
        try:
            while True:
                try:
                    batch = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if self._writer_stop.is_set():
                        return
                    self._cleanup_dirty()
                    self._write_status()
                    continue
                if batch is None:
                    return
                self._write(batch)
        except BaseException as exc:  # the reader checks `_writer_error` and stops with it
            log.exception("writing a batch failed")
            self._writer_error = exc

    def _check_writer(self) -> None:
        if self._writer_error is not None:
            raise WarehouseError(
                f"writing to {self.cfg.warehouse} failed: {self._writer_error}"
            ) from self._writer_error
        self._check_publisher()

    def _check_publisher(self) -> None:
        if self.publisher.error is not None:
            raise WarehouseError(f"publishing Parquet failed: {self.publisher.error}") from self.publisher.error

    def _hand_over(self, batch: _Batch | None) -> None:
        """Queue a batch (None: no more) for the writer; waits while the writer is a batch behind."""
        while True:
            self._check_writer()
            try:
                self._queue.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def _commit_to_kafka(self) -> None:
        """Tell Kafka what DuckDB committed (only for operators' lag views; the sink resumes from DuckDB)."""
        with self._committed_lock:
            if self._committed == self._kafka_committed:
                return
            offsets = dict(self._committed)
        self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True)
        self._kafka_committed = offsets

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
        status = {
            "warehouse": str(Path(self.cfg.warehouse).resolve()),
            "tables": counts,
            "records": self.stats.records,
            "dead_letters": self.stats.dead_letters,
            "parquet_dir": str(Path(self.cfg.parquet_dir).resolve()),
            "parquet_snapshot": snap.name if snap else None,
            "updated_at": datetime.now(UTC).isoformat(),
        }
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(status))
        tmp.replace(self.status_path)

    def consumed_all(self) -> bool:
        """Every partition has been read up to the end it had when the sink started."""
        return all(self._consumed.get(tp, 0) >= high for tp, high in self._high.items())

    def stop(self) -> None:
        self._stop.set()

    def run(self, until_caught_up: bool = False) -> SinkStats:
        """Consume and load until stopped (or, with `until_caught_up`, until the topics are loaded).

        This thread consumes and decodes; a writer thread writes the closed batches into DuckDB, so
        decoding the next batch overlaps the insert and commit of the last one (DuckDB and librdkafka
        release the GIL). The queue between them holds one batch, which bounds memory.
        """
        writer = threading.Thread(target=self._writer, name="duckdb-writer", daemon=True)
        try:
            self._assign()
            self.publisher.start()
            writer.start()
            self.say(f"sink: loading {', '.join(self.topics)} into {self.cfg.warehouse} and {self.cfg.parquet_dir}")
            pending: _Pending | None = None
            while not self._stop.is_set():
                self._check_writer()
                want = max(1, min(500, self.cfg.batch_max_records - (pending.records if pending else 0)))
                # consume() waits for `want` messages until the timeout: take what is there at once,
                # and wait only when there is nothing at all.
                got = self.consumer.consume(num_messages=want, timeout=0)
                if not got:
                    wait = 0.2 if pending is None else min(0.02, max(0.0, pending.deadline - time.monotonic()))
                    got = self.consumer.consume(num_messages=want, timeout=wait)
                for msg in got:
                    err = msg.error()
                    if err is None:
                        if pending is None:
                            pending = _Pending(self.families, self.cfg.batch_max_seconds)
                        self._add(pending, msg)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.error("consumer error: %s", err)
                del got  # the messages' buffers go back to librdkafka now, not after the next consume
                if until_caught_up and self.consumed_all():
                    break  # the writer still commits what is read; the last batch need not wait for its deadline
                if pending is not None and (
                    pending.records >= self.cfg.batch_max_records
                    or pending.bytes >= self.cfg.batch_max_bytes
                    or time.monotonic() >= pending.deadline
                ):
                    self._hand_over(self._close_batch(pending))
                    pending = None
                self._commit_to_kafka()
            if pending is not None:
                self._hand_over(self._close_batch(pending))
            self._hand_over(None)
            writer.join()
            self._check_writer()
            self._commit_to_kafka()
            self.publisher.stop(final=True)
            self._cleanup_dirty()
            self._write_status(force=True)
        finally:
            self._writer_stop.set()
            if writer.is_alive():
                writer.join()
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


def write_batch(
    con: duckdb.DuckDBPyConnection, families: dict[str, Family], batch: _Batch, seq: int, published: int = 0
) -> dict[str, int]:
    """Load `batch` as load `seq` in one transaction: its rows, its ledger entry and the offsets after
    it (and forget dirty days the publisher wrote up to `published`); then check that the commit
    kept every row. Returns the rows inserted per table."""
    rows: dict[str, int] = {}
    with transaction(con):
        for t, family_tables in batch.tables.items():
            rows |= replace_rows(con, families[t], family_tables, seq)
        if rows:
            ledger.record(con, seq, rows, batch.first_offsets)
        if published:
            run(con, "DELETE FROM _callstream_dirty WHERE seq <= ?", [published])
        now = datetime.now(UTC).replace(tzinfo=None)
        insert_rows(
            con,
            "INSERT OR REPLACE INTO _callstream_offsets VALUES",
            [(t, p, o, now) for (t, p), o in batch.next_offsets.items()],
        )
    check_committed(con, seq, rows)
    return rows


def replace_rows(
    con: duckdb.DuckDBPyConnection, family: Family, tables: dict[str, pa.Table], seq: int
) -> dict[str, int]:
    """In the caller's transaction: delete the stored versions of the batch's keys (parent and
    children), insert the new rows with load sequence `seq`, and note the replaced rows' Parquet parts
    and their loads' ledger counts. Returns the rows inserted per table (tables with rows only)."""
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
                where = f"{key} IN (SELECT {key} FROM _batch_keys)"
                ledger.note_replaced(con, t, where)
                run(con, f"DELETE FROM {t.name} WHERE {where}")
    finally:
        con.unregister("_batch_keys")
    rows: dict[str, int] = {}
    for t in family.tables:
        data = tables[t.name]
        if data.num_rows:
            con.register("_batch_rows", data)
            try:
                inserted = scalar(con, f"INSERT INTO {t.name} SELECT *, {int(seq)} FROM _batch_rows")
            finally:
                con.unregister("_batch_rows")
            check_loaded(con, t.name, seq, data.num_rows, inserted)
            rows[t.name] = data.num_rows
    return rows


def check_loaded(con: duckdb.DuckDBPyConnection, table: str, seq: int, want: int, inserted: Any) -> None:
    """Raise (so the caller rolls back) unless the table holds exactly `want` rows of load `seq`.

    A guard, not a formality: an INSERT from a registered Arrow table once stored fewer rows than
    the table held, without an error, and the offsets committed with it would have skipped the
    rest for good. Counting in the open transaction turns that into a stop before the commit.
    """
    stored = _load_rows(con, table, seq)
    if inserted != want or stored != want:
        raise WarehouseError(
            f"load {seq} into {table}: the batch holds {want} rows, the INSERT reported {inserted} and the "
            f"table holds {stored}; rolled back, so nothing of this batch is stored and its offsets do not move"
        )


def check_committed(con: duckdb.DuckDBPyConnection, seq: int, rows: dict[str, int]) -> None:
    """After COMMIT: raise (so the sink stops) unless each table holds the rows load `seq` inserted.

    The count before COMMIT saw them; this is for rows lost in the commit itself. Stopping is enough:
    the load ledger committed with the rows says how many there must be, so the next start finds the
    load short and reloads it from Kafka (warehouse/ledger.py). Carrying on would leave the gap in
    DuckDB and Parquet until then.
    """
    for table, want in rows.items():
        stored = _load_rows(con, table, seq)
        if stored != want:
            raise WarehouseError(
                f"load {seq} into {table}: {want} rows inserted, but the table holds {stored} after COMMIT; stopping, "
                "the next start reloads this load from Kafka"
            )


def _load_rows(con: duckdb.DuckDBPyConnection, table: str, seq: int) -> int:
    # Cheap on a large table: loads are appended in sequence, so min/max skip the older row groups
    # (0.6 ms on 6 million rows).
    return int(scalar(con, f"SELECT count(*) FROM {table} WHERE _load_seq = ?", [seq]))


def status_path(warehouse: str) -> Path:
    """Where the sink publishes its row counts after every commit."""
    return Path(warehouse).with_suffix(".status.json")


def run_sink(settings: SinkSettings, until_caught_up: bool = False) -> SinkStats:
    # Arrow's default allocator keeps freed batches' memory; malloc gives it back (and the sink's
    # peak RSS stays lower at the same speed).
    pa.set_memory_pool(pa.system_memory_pool())
    # The writer thread takes the GIL back after every DuckDB call, and with the default 5 ms switch
    # interval it waits that long behind the decoding thread each time: a dozen calls per batch made
    # the writer the bottleneck. 0.5 ms costs the decoder little (measured: 20k calls in 3.9 s, not 4.8 s).
    sys.setswitchinterval(0.0005)
    sink = Sink(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sink.stop())
    with sink_metrics(settings, lambda: sink.stats):
        stats = sink.run(until_caught_up=until_caught_up)
    log.info("sink stopped: %d records, %d rows, %d dead letters", stats.records, stats.rows, stats.dead_letters)
    return stats
