"""The sink's exactly-once invariant, checked directly: what DuckDB stores against what the topics hold.

For every (topic, partition) in `_callstream_offsets`, the parent table holds exactly the keys the
partition holds below the stored offset, once each, with the offset of the key's last delivery
below it; every parent has all its child rows; no row comes from a partition with no stored offset;
and nothing went to the dead-letter topic. A crash at any moment must leave a database that passes,
as the sink's next start leaves it: a load that the load ledger finds short after DuckDB's WAL replay
is undone there and its partitions are read again from where it began (see warehouse/ledger.py), so
that is what is audited, with a warning. Until the sink has read that far again, rows of later loads
lie beyond the moved-back offsets and the undone load's rows are missing, so meanwhile only the
checks that hold at any offset (no key twice, every parent with its child rows) apply.
"""

from __future__ import annotations

import shutil
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
from confluent_kafka import Consumer, KafkaError, TopicPartition

from kernel.catalogue import DEAD_LETTER, Header, topic
from warehouse import ledger
from warehouse.read import connect
from warehouse.schema import TABLES

FAMILIES = {"call_analyzed": ("calls", "call_id"), "chat_analyzed": ("chats", "chat_id")}

_CHILDREN = """
    SELECT 'utterances of ' || c.call_id FROM calls c
      LEFT JOIN (SELECT call_id, count(*) n FROM call_utterances GROUP BY ALL) u USING (call_id)
      WHERE c.utterance_count <> coalesce(u.n, 0)
    UNION ALL
    SELECT 'tool calls of ' || c.call_id FROM calls c
      LEFT JOIN (SELECT call_id, count(*) n FROM call_tool_calls GROUP BY ALL) u USING (call_id)
      WHERE c.tool_call_count <> coalesce(u.n, 0)
    UNION ALL
    SELECT 'messages of ' || c.chat_id FROM chats c
      LEFT JOIN (SELECT chat_id, count(*) n FROM chat_messages GROUP BY ALL) m USING (chat_id)
      WHERE c.message_count <> coalesce(m.n, 0)
    UNION ALL
    SELECT 'utterances without their call ' || call_id FROM call_utterances ANTI JOIN calls USING (call_id)
    UNION ALL
    SELECT 'messages without their chat ' || chat_id FROM chat_messages ANTI JOIN chats USING (chat_id)
"""


Offsets = dict[tuple[str, int], int]


class TopicLog:
    """Every record of a run's analyzed-call and analyzed-chat topics (and its dead letters), read by
    a consumer of our own from the start, as far as asked."""

    def __init__(self, bootstrap: str, prefix: str, timeout: float = 30.0) -> None:
        self.names = {suffix: topic(prefix, suffix) for suffix in (*FAMILIES, DEAD_LETTER)}
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"audit-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,  # how the end of a partition is known, transaction markers and all
            }
        )
        deadline = time.monotonic() + timeout
        while True:  # a topic just created can take a moment to show in the metadata
            meta = self.consumer.list_topics(timeout=timeout)
            if all(t in meta.topics and meta.topics[t].error is None for t in self.names.values()):
                break
            assert time.monotonic() < deadline, f"topics {sorted(self.names.values())} are not all on the broker"
            time.sleep(0.2)
        self.partitions = [TopicPartition(t, p, 0) for t in self.names.values() for p in meta.topics[t].partitions]
        self.consumer.assign(self.partitions)
        self.keys: dict[tuple[str, int], list[str]] = defaultdict(list)  # (topic, partition) -> key at each offset
        self.read_to: Offsets = {}  # (topic, partition) -> the offset read up to, dead letters included
        self.dead_letters: list[str] = []
        self.owed_reload: Offsets = {}  # see restart_state

    def close(self) -> None:
        self.consumer.close()

    def _poll(self, timeout: float) -> None:
        for m in self.consumer.consume(500, timeout=timeout):
            tp = (str(m.topic()), int(m.partition() or 0))
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.read_to[tp] = max(self.read_to.get(tp, 0), int(m.offset() or 0))
                continue
            self.read_to[tp] = max(self.read_to.get(tp, 0), int(m.offset() or 0) + 1)
            if m.topic() == self.names[DEAD_LETTER]:
                headers = dict(m.headers() or [])
                self.dead_letters.append(
                    f"{headers.get('source_topic', b'?').decode()}"
                    f"[{headers.get('source_partition', b'?').decode()}]"
                    f"@{headers.get('source_offset', b'?').decode()} key {m.key()!r}: "
                    f"{headers.get(Header.REASON, b'?').decode(errors='replace')}"
                )
                continue
            keys = self.keys[tp]
            assert m.offset() == len(keys), f"{m.topic()}[{m.partition()}]: offset {m.offset()} after {len(keys)}"
            keys.append((m.key() or b"").decode())

    def _ends(self) -> Offsets:
        """Each partition's end (high watermark) as the broker has it now."""
        ends: Offsets = {}
        for tp in self.partitions:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=15)
            ends[(tp.topic, tp.partition)] = int(high)
        return ends

    def read_until(self, offsets: Offsets, timeout: float = 60.0) -> None:
        """Read every partition up to `offsets` and up to the end it has now, dead letters included: a
        fresh consumer's first poll can return nothing, so "whatever is there" is asked of the broker."""
        deadline = time.monotonic() + timeout
        want = self._ends()
        for tp, o in offsets.items():
            want[tp] = max(want.get(tp, 0), o)
        while True:
            behind = {tp: (self.read_to.get(tp, 0), o) for tp, o in want.items() if self.read_to.get(tp, 0) < o}
            if not behind:
                return
            assert time.monotonic() < deadline, f"the topics end before the offsets asked (read, asked): {behind}"
            self._poll(0.2)

    def last_deliveries(self, suffix: str, offsets: dict[tuple[str, int], int]) -> dict[tuple[int, str], int]:
        """(partition, key) -> the offset of the key's last delivery below the stored offset."""
        name = self.names[suffix]
        want: dict[tuple[int, str], int] = {}
        for (t, p), next_offset in offsets.items():
            if t == name:
                for o, key in enumerate(self.keys[(t, p)][:next_offset]):
                    want[(p, key)] = o
        return want


def stored_offsets(db: Path) -> dict[tuple[str, int], int] | None:
    """The offsets committed in the database; None if no batch can have been committed yet."""
    if not db.exists():
        return None
    with duckdb.connect(str(db), read_only=True) as con:
        names = {n for (n,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "_callstream_offsets" not in names:  # killed while creating the tables
            return None
        rows = con.execute("SELECT topic, kafka_partition, next_offset FROM _callstream_offsets").fetchall()
    return {(t, p): o for t, p, o in rows}


def copy_db(db: Path, to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for f in db.parent.glob(db.name + "*"):  # the database, its WAL and any other file DuckDB keeps beside
        if f.is_file():
            shutil.copy2(f, to / f.name)


def as_restarted(db: Path) -> tuple[Path, list[ledger.Mismatch]]:
    """The database as the sink's next start leaves it before loading anything, and what its load
    ledger found: if a load is short, a copy with that load undone and its offsets moved back."""
    with duckdb.connect(str(db), read_only=True) as con:
        names = {n for (n,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "_callstream_ledger_base" not in names or not ledger.check(con):
            return db, []
    work = db.parent / "as-restarted"
    shutil.rmtree(work, ignore_errors=True)
    copy_db(db, work)
    with duckdb.connect(str(work / db.name)) as con:
        found = ledger.repair(con, lambda topic, partition: 0)
    return work / db.name, found


def restart_state(db: Path, owed: Offsets) -> tuple[Path, Offsets, bool]:
    """The database as the next start leaves it, its stored offsets, and whether every check applies.

    `owed` carries over between audits: the offsets the sink had stored before a start moved them
    back to reload a short load (warned about); it empties once the stored offsets are there again.
    """
    view, found = as_restarted(db)
    if found:
        warnings.warn(f"the sink's next start reloads short loads: {'; '.join(map(str, found))}", stacklevel=2)
        for tp, o in (stored_offsets(db) or {}).items():
            owed[tp] = max(owed.get(tp, 0), o)
    db = view
    offsets = stored_offsets(db)
    assert offsets is not None
    if all(offsets.get(tp, 0) >= o for tp, o in owed.items()):
        owed.clear()
    return db, offsets, not owed


LastDeliveries = Callable[[str, dict[tuple[str, int], int]], dict[tuple[int, str], int]]


def database_problems(db: Path, offsets: Offsets, last_deliveries: LastDeliveries, strict: bool = True) -> list[str]:
    """How the database breaks the invariant against the input, each named (empty: it holds).

    `last_deliveries(suffix, offsets)` gives, for the topic of `suffix`, (partition, key) -> the
    offset of the key's last delivery below the stored offset: read from Kafka or from a fixed log.
    Without `strict` (a reload is under way, see `restart_state`) the keys are not compared with it.
    """
    with duckdb.connect(str(db), read_only=True) as con:
        stored = {
            suffix: {
                (p, k): o
                for k, p, o in con.execute(f"SELECT {key}, kafka_partition, kafka_offset FROM {table}").fetchall()
            }
            for suffix, (table, key) in FAMILIES.items()
        }
        doubled = {
            table: con.execute(f"SELECT count(*) - count(DISTINCT {key}) FROM {table}").fetchone()
            for table, key in FAMILIES.values()
        }
        children = [r[0] for r in con.execute(_CHILDREN).fetchall()]
    problems = [f"child rows do not match their parent: {c}" for c in children[:10]]
    problems += [f"{table}: {n[0]} keys stored twice" for table, n in doubled.items() if n and n[0]]
    for suffix, (table, _) in FAMILIES.items() if strict else ():
        want, have = last_deliveries(suffix, offsets), stored[suffix]
        for label, keys in (
            ("in the topic below the stored offset but not in the table", sorted(set(want) - set(have))),
            ("in the table but not in the topic below the stored offset", sorted(set(have) - set(want))),
            (
                "stored from an earlier delivery than the last one",
                sorted(k for k in set(want) & set(have) if want[k] != have[k]),
            ),
        ):
            if keys:
                problems.append(
                    f"{table}: {len(keys)} {label}: "
                    + ", ".join(
                        f"{k} [{p}] (last delivery @{want.get((p, k))}, row from @{have.get((p, k))})"
                        for p, k in keys[:10]
                    )
                    + f"; stored offsets {offsets}"
                )
    return problems


def audit(db: Path, log: TopicLog) -> list[str]:
    """Every way the database breaks the invariant against the topics, each named (empty: it holds)."""
    offsets = stored_offsets(db)
    problems: list[str] = []
    if offsets is not None:
        db, offsets, strict = restart_state(db, log.owed_reload)
        log.read_until(offsets)
        problems += database_problems(db, offsets, log.last_deliveries, strict)
    else:
        log.read_until({})
    if log.dead_letters:
        problems.append(f"{len(log.dead_letters)} dead letters: {log.dead_letters[:10]}")
    return problems


def _rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple]:
    t = next(t for t in TABLES if t.name == table)
    cols = ", ".join(t.column_names)
    return con.execute(f"SELECT {cols} FROM {table} ORDER BY {', '.join(t.key)}").fetchall()


def assert_parquet_equals_duckdb(db: Path, parquet: Path) -> dict[str, int]:
    """Every table: the same rows in the DuckDB file, the snapshot views, and a plain hive glob."""
    counts = {}
    with duckdb.connect(str(db), read_only=True) as con:
        reader = connect(parquet)
        for t in TABLES:
            want = _rows(con, t.name)
            assert _rows(reader, t.name) == want, f"{t.name}: Parquet snapshot differs from DuckDB"
            counts[t.name] = len(want)
            if want:
                glob = str(parquet / t.name / "**" / "*.parquet")
                n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true)").fetchall()
                assert n == [(len(want),)]
                assert len(pd.read_parquet(parquet / t.name)) == len(want)
                assert ds.dataset(parquet / t.name, partitioning="hive").count_rows() == len(want)
        reader.close()
    return counts
