"""`callstream sink`: analyzed calls from Kafka into DuckDB, exactly once.

The rows of a batch and the Kafka offsets they came from are committed in one DuckDB transaction,
and on (re)assignment the consumer seeks to the offsets stored there, so a crash at any moment
neither loses a batch nor loads it twice. A retried delivery of the same call replaces its row.
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
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from callstream.catalogue import DEAD_LETTER, Header, topic
from warehouse.errors import RecordError, WarehouseError
from warehouse.records import call_row, ms_to_ts, parse_body
from warehouse.schema import CALLS, TABLES, create_all
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


class Sink:
    def __init__(self, settings: SinkSettings, say: Callable[[str], None] = log.info) -> None:
        self.cfg = settings
        self.say = say
        self.topics = [topic(settings.topic_prefix, "call_analyzed")]
        self.dead_letter_topic = topic(settings.topic_prefix, DEAD_LETTER)
        Path(settings.warehouse).parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(settings.warehouse)
        self.status_path = status_path(settings.warehouse)
        create_all(self.con)
        self.stats = SinkStats()
        self._stop = threading.Event()
        self._high: dict[tuple[str, int], int] = {}
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.group_id}-{settings.topic_prefix}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "fetch.max.bytes": 52428800,
            "max.partition.fetch.bytes": 10485760,
        })
        self._dlq: Producer | None = None

    # -- offsets -------------------------------------------------------------------------------

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        rows = self.con.execute("SELECT topic, kafka_partition, next_offset FROM _callstream_offsets").fetchall()
        return {(t, p): o for t, p, o in rows}

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        stored = self.stored_offsets()
        for tp in partitions:
            off = stored.get((tp.topic, tp.partition))
            if off is not None:
                tp.offset = off
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            self._high[(tp.topic, tp.partition)] = high
        consumer.assign(partitions)
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._high.pop((tp.topic, tp.partition), None)

    # -- loading -------------------------------------------------------------------------------

    def _dead_letter(self, msg: Message, reason: str) -> None:
        if self._dlq is None:
            self._dlq = Producer({"bootstrap.servers": self.cfg.kafka_bootstrap, "enable.idempotence": True})
        headers = [(Header.REASON, reason.encode()), ("source_topic", str(msg.topic()).encode()),
                   ("source_offset", str(msg.offset()).encode())]
        self._dlq.produce(self.dead_letter_topic, value=msg.value(), key=msg.key(),
                          headers=[*(msg.headers() or []), *headers])
        self.stats.dead_letters += 1
        log.warning("dead-lettered %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason)

    def load(self, msgs: list[Message]) -> int:
        """Load one batch and its offsets in one transaction; return the rows written."""
        rows: dict[str, dict[str, Any]] = {}
        next_offsets: dict[tuple[str, int], int] = {}
        now = datetime.now(UTC).replace(tzinfo=None)
        for msg in msgs:
            next_offsets[(str(msg.topic()), int(msg.partition() or 0))] = int(msg.offset() or 0) + 1
            try:
                body = parse_body(msg.value() or b"")
                row = call_row(body.get("call"))  # type: ignore[arg-type]
            except RecordError as exc:
                self._dead_letter(msg, str(exc))
                continue
            recv = _header(msg, Header.RECEIVED_AT)
            row.update(
                event_received_at=ms_to_ts(int(recv)) if recv else None,
                kafka_partition=msg.partition(), kafka_offset=msg.offset(), loaded_at=now,
            )
            rows[row["call_id"]] = row  # the latest delivery of a call in the batch wins
        if self._dlq is not None and self._dlq.flush(30) > 0:
            raise WarehouseError("the dead-letter topic did not acknowledge; not committing this batch")
        batch = pa.Table.from_pylist(list(rows.values()), schema=CALLS.arrow_schema)
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            if batch.num_rows:
                con.register("batch_calls", batch)
                con.execute("DELETE FROM calls WHERE call_id IN (SELECT call_id FROM batch_calls)")
                con.execute("INSERT INTO calls SELECT * FROM batch_calls")
                con.unregister("batch_calls")
            con.executemany(
                "INSERT OR REPLACE INTO _callstream_offsets VALUES (?, ?, ?, ?)",
                [(t, p, o, now) for (t, p), o in next_offsets.items()],
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        # Kafka's committed offsets only show lag to operators; DuckDB's are the ones we resume from.
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()], asynchronous=True
        )
        self.stats.batches += 1
        self.stats.records += len(msgs)
        self.stats.rows += batch.num_rows
        self._write_status()
        return batch.num_rows

    def _write_status(self) -> None:
        """A small JSON beside the database, for readers that cannot open it while we hold the lock."""
        counts = {t.name: self.con.execute(f"SELECT count(*) FROM {t.name}").fetchone()[0] for t in TABLES}  # type: ignore[index]
        status = {"warehouse": str(Path(self.cfg.warehouse).resolve()), "tables": counts,
                  "records": self.stats.records, "dead_letters": self.stats.dead_letters,
                  "updated_at": datetime.now(UTC).isoformat()}
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(status))
        tmp.replace(self.status_path)

    def caught_up(self) -> bool:
        """Every assigned partition has been loaded up to the end it had when it was assigned."""
        if not self._high:
            return False
        stored = self.stored_offsets()
        return all(stored.get(tp, 0) >= high for tp, high in self._high.items())

    def stop(self) -> None:
        self._stop.set()

    def run(self, until_caught_up: bool = False) -> SinkStats:
        """Consume and load until stopped (or, with `until_caught_up`, until the topics are loaded)."""
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.say(f"sink: loading {', '.join(self.topics)} into {self.cfg.warehouse}")
        pending: list[Message] = []
        deadline = time.monotonic() + self.cfg.batch_max_seconds
        try:
            while not self._stop.is_set():
                want = self.cfg.batch_max_records - len(pending)
                for msg in self.consumer.consume(num_messages=want, timeout=0.2):
                    err = msg.error()
                    if err is None:
                        pending.append(msg)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.error("consumer error: %s", err)
                full = len(pending) >= self.cfg.batch_max_records
                if pending and (full or time.monotonic() >= deadline):
                    self.load(pending)
                    pending = []
                if time.monotonic() >= deadline:
                    deadline = time.monotonic() + self.cfg.batch_max_seconds
                    if until_caught_up and not pending and self.caught_up():
                        break
            if pending:
                self.load(pending)
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            self.con.close()
            if self._dlq is not None:
                self._dlq.flush(10)


def status_path(warehouse: str) -> Path:
    """Where the sink publishes its row counts after every commit."""
    return Path(warehouse).with_suffix(".status.json")


def run_sink(settings: SinkSettings, until_caught_up: bool = False) -> SinkStats:
    sink = Sink(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sink.stop())
    stats = sink.run(until_caught_up=until_caught_up)
    log.info("sink stopped: %d records, %d rows, %d dead letters", stats.records, stats.rows, stats.dead_letters)
    return stats
