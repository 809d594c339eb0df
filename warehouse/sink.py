"""`callstream sink`: analyzed calls and chats from Kafka into DuckDB and Parquet, exactly once.

The rows of a batch and the Kafka offsets they came from are committed in one DuckDB transaction
(`warehouse.load`), and at start the consumer is assigned every partition at the offsets stored
there, so a crash at any moment neither loses a batch nor loads it twice. Partitions are assigned,
not subscribed: there is one writer per DuckDB file anyway, and a restart after a crash does not
wait for a consumer-group session to time out.

One thread consumes and decodes (`warehouse.batching`); a writer thread loads the closed batches,
so decoding the next batch overlaps the insert and commit of the last one (DuckDB and librdkafka
release the GIL). The queue between them holds one batch, which bounds memory.
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
from pathlib import Path

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from kernel.catalogue import DEAD_LETTER, topic
from kernel.topics import ensure_topics, wait_for_topics
from warehouse import ledger
from warehouse.batching import KafkaConsumer, OpenBatch, consumer_config, take
from warehouse.db import open_for_writing, run, scalar
from warehouse.dead_letters import DeadLetters
from warehouse.errors import WarehouseError
from warehouse.forget import forgotten_keys
from warehouse.load import Batch, Offsets, write_batch
from warehouse.metrics import sink_metrics
from warehouse.migrations import migrate
from warehouse.parquet import ParquetPublisher
from warehouse.personal_data import PersonalData
from warehouse.schema import FAMILIES, TABLES, Family, last_load_seq
from warehouse.settings import SinkSettings
from warehouse.status import write_status

log = logging.getLogger(__name__)
_SAY_EVERY_S = 5.0


@dataclass
class SinkStats:
    batches: int = 0
    records: int = 0
    rows: int = 0
    dead_letters: int = 0
    started: float = field(default_factory=time.monotonic)


# Errors of a partition whose leader is not known yet (a topic just created, a broker failing over).
_LEADERLESS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._TIMED_OUT,
    }
)


def _passing(err: KafkaError) -> bool:
    return bool(err.retriable()) or err.code() in _LEADERLESS


class _Stopped(Exception):
    """A stop (SIGTERM, Ctrl-C) came while the sink was still waiting to start loading."""


class Sink:
    """Kafka -> DuckDB + Parquet. `consumer` and `create_topics` let a stress harness stand in for Kafka."""

    def __init__(
        self,
        settings: SinkSettings,
        say: Callable[[str], None] = log.info,
        consumer: KafkaConsumer | None = None,
        create_topics: bool = True,
    ) -> None:
        self.cfg = settings
        self.say = say
        self.families: dict[str, Family] = {topic(settings.topic_prefix, f.topic_suffix): f for f in FAMILIES}
        self.topics = list(self.families)
        self.create_topics = create_topics
        self.con = open_for_writing(settings.warehouse, settings.duckdb_memory_limit, settings.duckdb_threads)
        migrate(self.con)
        self.personal = PersonalData.from_settings(settings)
        self.forgotten = forgotten_keys(self.con)  # `warehouse forget` runs only while no sink does
        self.stats = SinkStats()
        self._stop = threading.Event()
        self._high: Offsets = {}
        # Load sequence numbers only grow, across restarts too (they name the Parquet parts).
        self._seq = max(
            last_load_seq(self.con, TABLES),
            ledger.last_seq(self.con),
            int(scalar(self.con, "SELECT coalesce(max(seq), 0) FROM _callstream_dirty") or 0),
        )
        self._cleaned_seq = 0
        self._status_at = 0.0
        self._checkpoint_at = time.monotonic()
        self._rows: dict[str, int] | None = None  # rows per table, kept up to date by each load
        self.publisher = self._publisher()
        group = settings.consumer_group()
        self.consumer = consumer or Consumer(
            consumer_config(settings.kafka_bootstrap, group, settings.fetch_queue_kbytes),
            on_commit=self._on_kafka_commit,
        )
        self.dead_letters = DeadLetters(settings.kafka_bootstrap, topic(settings.topic_prefix, DEAD_LETTER))
        # Between the consuming thread and the writer thread (see run()).
        self._queue: queue.Queue[Batch | None] = queue.Queue(maxsize=1)
        self._writer_stop = threading.Event()
        self._writer_error: BaseException | None = None
        self._committed_lock = threading.Lock()
        self._committed: Offsets = {}  # next offsets committed in DuckDB
        self._kafka_committed: Offsets = {}
        self._kafka_retry_at = 0.0  # after a refused commit, when to commit again
        self._consumed: Offsets = {}  # next offsets read (the consuming thread's only)

    def _publisher(self) -> ParquetPublisher:
        cfg = self.cfg
        publisher = ParquetPublisher(
            self.con,
            Path(cfg.parquet_dir),
            min_interval=cfg.parquet_min_interval_seconds,
            retention_seconds=cfg.snapshot_retention_seconds,
            compression=cfg.parquet_compression,
        )
        published = publisher.published_seq()
        if published > self._seq:
            raise WarehouseError(
                f"the Parquet folder {cfg.parquet_dir} holds loads up to {published}, but {cfg.warehouse} "
                f"only up to {self._seq}: it was written from another database. Move it away (the sink rewrites "
                "it from the database) or set CALLSTREAM_PARQUET_DIR to another folder."
            )
        return publisher

    # -- partitions and offsets ------------------------------------------------------------------

    def stored_offsets(self) -> Offsets:
        rows = run(self.con, "SELECT topic, kafka_partition, next_offset FROM _callstream_offsets")
        return {(t, p): o for t, p, o in rows}

    def _low_watermark(self, t: str, p: int) -> int:
        return self._watermarks(t, p)[0]

    def _watermarks(self, t: str, p: int) -> tuple[int, int]:
        """A partition's low and high offsets; a topic just created has no leader for a moment."""
        deadline = time.monotonic() + 60
        while True:
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(t, p), timeout=15)
                return int(low), int(high)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not (isinstance(err, KafkaError) and _passing(err)) or time.monotonic() > deadline:
                    raise WarehouseError(
                        f"cannot read the offsets of {t}[{p}] on {self.cfg.kafka_bootstrap}: {exc}"
                    ) from exc
                log.info("sink not loading yet: %s[%d] has no leader yet (%s)", t, p, err.str())
                if self._stop.wait(0.5):
                    raise _Stopped from exc

    def _await_topics(self, until_caught_up: bool) -> None:
        """Create the topics when missing. A batch run fails at once when Kafka does not answer; a
        service waits for it, saying so every few seconds."""
        cfg = self.cfg
        if until_caught_up:
            ensure_topics(cfg.kafka_bootstrap, cfg.topic_prefix, cfg.topic_partitions, replication=cfg.replication())
            return
        wait_for_topics(
            cfg.kafka_bootstrap,
            self.topics,
            create_partitions=cfg.topic_partitions,
            replication=cfg.replication(),
            on_wait=lambda what: log.info("sink not loading yet: %s", what),
            stop=self._stop,
        )

    def _partitions(self) -> dict[str, list[int]]:
        """Each topic's partitions as this consumer's metadata shows them, which can lag a moment
        behind topics just created: waited for, with a line every few seconds."""
        said = time.monotonic()
        while True:
            try:
                meta = self.consumer.list_topics(timeout=15)
            except KafkaException as exc:
                raise WarehouseError(f"cannot reach Kafka at {self.cfg.kafka_bootstrap}: {exc}") from exc
            found = {t: sorted(m.partitions) for t, m in meta.topics.items() if m.error is None and m.partitions}
            missing = [t for t in self.topics if t not in found]
            if not missing or self._stop.is_set():
                return {t: found.get(t, []) for t in self.topics}
            if time.monotonic() - said >= _SAY_EVERY_S:
                log.info("sink not loading yet: waiting for topics %s in the consumer's metadata", ", ".join(missing))
                said = time.monotonic()
            self._stop.wait(0.5)

    def _assign(self, until_caught_up: bool) -> None:
        if self.create_topics:
            self._await_topics(until_caught_up)
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
        parts: list[TopicPartition] = []
        for t, partitions in self._partitions().items():
            for p in partitions:
                low, high = self._watermarks(t, p)
                self._high[(t, p)] = high
                # An actual offset rather than OFFSET_BEGINNING spares the first fetch a lookup;
                # if retention moves past it, auto.offset.reset applies.
                parts.append(TopicPartition(t, p, stored.get((t, p), low)))
        self.consumer.assign(parts)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in parts))

    def consumed_all(self) -> bool:
        """Every partition has been read up to the end it had when the sink started. A transaction's
        marker (`callstream replay` writes in transactions) takes an offset but is no message, so a
        partition whose last message is behind its end asks the consumer's position, which counts it."""
        behind = [TopicPartition(t, p) for (t, p), high in self._high.items() if self._consumed.get((t, p), 0) < high]
        return not behind or all(
            tp.offset >= self._high[(tp.topic, tp.partition)] for tp in self.consumer.position(behind)
        )

    def _commit_to_kafka(self) -> None:
        """Tell Kafka what DuckDB committed (only for operators' lag views; the sink resumes from DuckDB)."""
        with self._committed_lock:
            if self._committed == self._kafka_committed or time.monotonic() < self._kafka_retry_at:
                return
            offsets = dict(self._committed)
        self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True)
        self._kafka_committed = offsets

    def _on_kafka_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """A commit Kafka refused (a broker away, its group coordinator still loading) is made again a
        second later; else the lag operators see would stay behind until the next batch, if any."""
        problem = err.str() if err is not None else next((tp.error.str() for tp in partitions if tp.error), None)
        if problem is None:
            return
        log.info("sink: Kafka did not take the loaded offsets (%s); committing them again", problem)
        self._kafka_committed = {}
        self._kafka_retry_at = time.monotonic() + 1.0

    # -- the writer thread -------------------------------------------------------------------------

    def _write(self, batch: Batch) -> int:
        """Write one batch and its offsets in one transaction; return the rows written."""
        self._check_publisher()
        self._seq += 1
        done = self.publisher.done_seq
        published = done if done > self._cleaned_seq else 0
        written = write_batch(self.con, self.families, batch, self._seq, published=published)
        rows = sum(written.inserted.values())
        if self._rows is not None:
            for name, n in written.inserted.items():
                self._rows[name] += n
            for name, n in written.deleted.items():
                self._rows[name] -= n
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
        """Batches into DuckDB in the order they were closed; idle upkeep between."""
        try:
            while True:
                try:
                    batch = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if self._writer_stop.is_set():
                        return
                    self._cleanup_dirty()
                    self._trim_ledger()
                    self._write_status()
                    continue
                if batch is None:
                    return
                self._write(batch)
                self._trim_ledger()
        except BaseException as exc:  # the consuming thread checks `_writer_error` and stops with it
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

    def _cleanup_dirty(self) -> None:
        """While idle: forget dirty days the publisher has written (a busy sink does it per batch)."""
        done = self.publisher.done_seq
        if done > self._cleaned_seq:
            run(self.con, "DELETE FROM _callstream_dirty WHERE seq <= ?", [done])
            self._cleaned_seq = done

    def _trim_ledger(self) -> None:
        """Every `checkpoint_seconds`: check the loads since the last time against the ledger,
        CHECKPOINT, and forget them, so the ledger stays small however long the sink runs and the
        start-up check reads only the loads since (DuckDB also checkpoints by itself)."""
        if time.monotonic() - self._checkpoint_at < self.cfg.checkpoint_seconds:
            return
        with self.publisher.between_rounds() as free:
            if not free:
                return  # tried again after the next batch
            # As at start: forget loads only once the tables agree with the ledger. A load found
            # short stops the sink, and the next start reloads it from Kafka.
            short = ledger.check(self.con)
            if short:
                raise WarehouseError(
                    f"{'; '.join(map(str, short))}; stopping, the next start reloads these loads from Kafka"
                )
            if ledger.forget_checkpointed(self.con, self._seq):
                self._checkpoint_at = time.monotonic()
            else:
                log.debug("the CHECKPOINT did not complete; the load ledger is trimmed after the next batch")

    def _write_status(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._status_at < 1.0:
            return
        self._status_at = time.monotonic()
        self.stats.dead_letters = self.dead_letters.count
        if self._rows is None:  # once; then each load adds what it inserted and takes off what it replaced
            self._rows = {t.name: int(scalar(self.con, f"SELECT count(*) FROM {t.name}")) for t in TABLES}
        write_status(self.cfg.warehouse, self.cfg.parquet_dir, self._rows, self.stats.records, self.stats.dead_letters)

    # -- the consuming thread ----------------------------------------------------------------------

    def _hand_over(self, batch: Batch | None) -> None:
        """Queue a batch (None: no more) for the writer; waits while the writer is a batch behind."""
        while True:
            self._check_writer()
            try:
                self._queue.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def _close(self, open_batch: OpenBatch) -> None:
        """Hand the open batch to the writer once its dead letters are acknowledged."""
        self.dead_letters.confirm()
        self._hand_over(
            Batch(open_batch.tables(), open_batch.first_offsets, open_batch.next_offsets, open_batch.records)
        )

    def _consume(self, until_caught_up: bool) -> None:
        cfg, open_batch = self.cfg, None
        while not self._stop.is_set():
            self._check_writer()
            want = max(1, min(500, cfg.batch_max_records - (open_batch.records if open_batch else 0)))
            idle_wait = 0.2 if open_batch is None else min(0.02, max(0.0, open_batch.deadline - time.monotonic()))
            for msg in take(self.consumer, want, idle_wait):
                if open_batch is None:
                    open_batch = OpenBatch(self.families, cfg.batch_max_seconds, self.personal, self.forgotten)
                t, p, next_offset = open_batch.add(msg, self.dead_letters)
                self._consumed[(t, p)] = next_offset
            if until_caught_up and self.consumed_all():
                break  # the writer still commits what is read; the last batch need not wait for its deadline
            if open_batch is not None and open_batch.due(cfg.batch_max_records, cfg.batch_max_bytes):
                self._close(open_batch)
                open_batch = None
            self._commit_to_kafka()
        if open_batch is not None:
            self._close(open_batch)

    def stop(self) -> None:
        self._stop.set()

    def run(self, until_caught_up: bool = False) -> SinkStats:
        """Consume and load until stopped (or, with `until_caught_up`, until the topics are loaded)."""
        writer = threading.Thread(target=self._writer, name="duckdb-writer", daemon=True)
        try:
            try:
                self._assign(until_caught_up)
            except _Stopped:
                return self.stats
            self.publisher.start()
            writer.start()
            self.say(f"sink: loading {', '.join(self.topics)} into {self.cfg.warehouse} and {self.cfg.parquet_dir}")
            log.info("personal data: %s", self.personal.describe())
            self._consume(until_caught_up)
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
            self.dead_letters.close()


def run_sink(settings: SinkSettings, until_caught_up: bool = False) -> SinkStats:
    # Arrow's default allocator keeps freed batches' memory; malloc gives it back.
    pa.set_memory_pool(pa.system_memory_pool())
    # The writer thread takes the GIL back after every DuckDB call and, at the default 5 ms switch
    # interval, waits that long behind the decoding thread each time; 0.5 ms costs the decoder little.
    sys.setswitchinterval(0.0005)
    sink = Sink(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sink.stop())
    with sink_metrics(settings, lambda: sink.stats):
        stats = sink.run(until_caught_up=until_caught_up)
    log.info("sink stopped: %d records, %d rows, %d dead letters", stats.records, stats.rows, stats.dead_letters)
    return stats
