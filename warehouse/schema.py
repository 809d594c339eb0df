"""The warehouse tables: DuckDB DDL and the matching Arrow schemas, defined once.

Every table has a `day` column (the UTC day of its call or chat). In DuckDB it is an ordinary
column; in Parquet it is the hive partition (`<table>/day=YYYY-MM-DD/data.parquet`), so it is not
stored inside the files. Child tables carry their parent's day, so one call's rows are always in
the same day partition of every table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from kernel.catalogue import ANALYZED, Subject
from warehouse.db import scalar


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sql: str
    arrow: pa.DataType


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    # The primary key, kept unique by the sink's replace check (warehouse.load), not by DuckDB: an
    # index (ART) lives in memory whole once used, and would grow with every call ever loaded.
    key: tuple[str, ...]
    # Child tables are replaced together with their parent, matched on `parent_key`.
    parent_key: str

    @property
    def is_parent(self) -> bool:
        return self.key == (self.parent_key,)

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow) for c in self.columns])

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def hidden(self) -> tuple[Column, ...]:
        """The columns only DuckDB has (never in Parquet, Arrow or the read views)."""
        return (LOAD_SEQ, KEY_HASH) if self.is_parent else (LOAD_SEQ,)

    def ddl(self) -> str:
        cols = ",\n  ".join(f"{c.name} {c.sql}" for c in (*self.columns, *self.hidden))
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  {cols}\n)"

    def empty_select(self) -> str:
        """A typed, empty SELECT with this table's columns (a view before any data exists)."""
        cols = ", ".join(f"CAST(NULL AS {c.sql.split()[0]}) AS {c.name}" for c in self.columns)
        return f"SELECT {cols} WHERE false"


_ARROW = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": pa.timestamp("ms"),
    "DATE": pa.date32(),
}


def _c(name: str, sql: str) -> Column:
    return Column(name, sql, _ARROW[sql.split()[0]])


# The batch that loaded a row (DuckDB only, not in Parquet): a publish writes the rows loaded since
# the last one into a new Parquet part, and finds the part that holds a replaced row.
LOAD_SEQ = Column("_load_seq", "BIGINT NOT NULL", pa.int64())

# A parent row's key hashed (`key_hash`): the replace check scans these 8 bytes a row to find the
# stored versions of a batch's keys, then compares the keys themselves (warehouse.load).
KEY_HASH = Column("_key_hash", "UBIGINT NOT NULL", pa.uint64())


def key_hash(expr: str) -> str:
    """SQL for the key hash of a VARCHAR expression: the first 8 bytes of its MD5 as a little-endian
    integer (`python_key_hash`). MD5, not DuckDB's hash(), whose values may change between releases."""
    return f"CAST(md5_number({expr}) & 18446744073709551615 AS UBIGINT)"


def python_key_hash(key: str) -> int:
    """`key_hash` computed outside DuckDB: the sink checks at start that both agree."""
    return int.from_bytes(hashlib.md5(key.encode(), usedforsecurity=False).digest()[:8], "little")


# Common tail of every table: where the row came from, so any row can be traced to its message.
_SOURCE = (
    _c("event_received_at", "TIMESTAMP"),
    _c("kafka_partition", "INTEGER"),
    _c("kafka_offset", "BIGINT"),
    _c("loaded_at", "TIMESTAMP"),
)
_DAY = _c("day", "DATE NOT NULL")

CALLS = Table(
    "calls",
    (
        _c("call_id", "VARCHAR NOT NULL"),
        _c("agent_id", "VARCHAR"),
        _c("agent_version", "BIGINT"),
        _c("agent_name", "VARCHAR"),
        _c("call_type", "VARCHAR"),
        _c("direction", "VARCHAR"),
        _c("from_number", "VARCHAR"),
        _c("to_number", "VARCHAR"),
        _c("call_status", "VARCHAR"),
        _c("disconnection_reason", "VARCHAR"),
        _c("start_timestamp", "TIMESTAMP"),
        _c("end_timestamp", "TIMESTAMP"),
        _c("duration_ms", "BIGINT"),
        _c("call_successful", "BOOLEAN"),
        _c("user_sentiment", "VARCHAR"),
        _c("in_voicemail", "BOOLEAN"),
        _c("call_summary", "VARCHAR"),
        _c("combined_cost", "DOUBLE"),
        _c("e2e_latency_p50", "DOUBLE"),
        _c("e2e_latency_p90", "DOUBLE"),
        _c("e2e_latency_p99", "DOUBLE"),
        _c("transfer_destination", "VARCHAR"),
        _c("transfer_end_timestamp", "TIMESTAMP"),
        _c("transcript", "VARCHAR"),
        _c("recording_url", "VARCHAR"),
        _c("metadata", "JSON"),
        _c("dynamic_variables", "JSON"),
        _c("collected_dynamic_variables", "JSON"),
        _c("custom_analysis_data", "JSON"),
        _c("call_cost", "JSON"),
        _c("data_storage_setting", "VARCHAR"),
        _c("opted_out", "BOOLEAN"),
        _c("utterance_count", "INTEGER"),
        _c("tool_call_count", "INTEGER"),
        _DAY,
        *_SOURCE,
    ),
    key=("call_id",),
    parent_key="call_id",
)

CALL_UTTERANCES = Table(
    "call_utterances",
    (
        _c("call_id", "VARCHAR NOT NULL"),
        _c("turn", "INTEGER NOT NULL"),
        _c("role", "VARCHAR"),
        _c("content", "VARCHAR"),
        _c("start_s", "DOUBLE"),
        _c("end_s", "DOUBLE"),
        # Everything else an entry of a role other than agent/user carries (dtmf digit, node ids...).
        _c("detail", "JSON"),
        _DAY,
    ),
    key=("call_id", "turn"),
    parent_key="call_id",
)

CALL_TOOL_CALLS = Table(
    "call_tool_calls",
    (
        _c("call_id", "VARCHAR NOT NULL"),
        _c("tool_call_id", "VARCHAR NOT NULL"),
        _c("seq", "INTEGER"),
        _c("name", "VARCHAR"),
        _c("arguments", "VARCHAR"),
        _c("result", "VARCHAR"),
        _c("successful", "BOOLEAN"),
        _DAY,
    ),
    key=("call_id", "tool_call_id"),
    parent_key="call_id",
)

CHATS = Table(
    "chats",
    (
        _c("chat_id", "VARCHAR NOT NULL"),
        _c("agent_id", "VARCHAR"),
        _c("agent_version", "BIGINT"),
        _c("chat_type", "VARCHAR"),
        _c("chat_status", "VARCHAR"),
        _c("start_timestamp", "TIMESTAMP"),
        _c("end_timestamp", "TIMESTAMP"),
        _c("duration_ms", "BIGINT"),
        _c("chat_successful", "BOOLEAN"),
        _c("user_sentiment", "VARCHAR"),
        _c("chat_summary", "VARCHAR"),
        _c("combined_cost", "DOUBLE"),
        _c("transcript", "VARCHAR"),
        _c("metadata", "JSON"),
        _c("dynamic_variables", "JSON"),
        _c("collected_dynamic_variables", "JSON"),
        _c("custom_analysis_data", "JSON"),
        _c("chat_cost", "JSON"),
        _c("message_count", "INTEGER"),
        _DAY,
        *_SOURCE,
    ),
    key=("chat_id",),
    parent_key="chat_id",
)

CHAT_MESSAGES = Table(
    "chat_messages",
    (
        _c("chat_id", "VARCHAR NOT NULL"),
        _c("turn", "INTEGER NOT NULL"),
        _c("message_id", "VARCHAR"),
        _c("role", "VARCHAR"),
        _c("content", "VARCHAR"),
        _c("created_at", "TIMESTAMP"),
        _c("tool_call_id", "VARCHAR"),
        _c("name", "VARCHAR"),
        _c("successful", "BOOLEAN"),
        _c("detail", "JSON"),
        _DAY,
    ),
    key=("chat_id", "turn"),
    parent_key="chat_id",
)


@dataclass(frozen=True, slots=True)
class Family:
    """A parent table and its children: loaded, replaced and published together."""

    name: str
    topic_suffix: str
    parent: Table
    children: tuple[Table, ...]

    @property
    def tables(self) -> tuple[Table, ...]:
        return (self.parent, *self.children)


CALL_FAMILY = Family("calls", ANALYZED[Subject.CALL], CALLS, (CALL_UTTERANCES, CALL_TOOL_CALLS))
CHAT_FAMILY = Family("chats", ANALYZED[Subject.CHAT], CHATS, (CHAT_MESSAGES,))
FAMILIES: tuple[Family, ...] = (CALL_FAMILY, CHAT_FAMILY)
TABLES: tuple[Table, ...] = tuple(t for f in FAMILIES for t in f.tables)
TABLES_BY_NAME: dict[str, Table] = {t.name: t for t in TABLES}


@dataclass(frozen=True, slots=True)
class KeyDays:
    """A Parquet-only index of a family: each parent key and its day, a part per publish, sorted by
    key. Readers find one call's day through it, so a lookup by key opens one day's files."""

    name: str
    key: str
    parent: Table


KEY_DAYS: tuple[KeyDays, ...] = (KeyDays("call_days", "call_id", CALLS), KeyDays("chat_days", "chat_id", CHATS))
KEY_DAYS_BY_NAME: dict[str, KeyDays] = {k.name: k for k in KEY_DAYS}

OFFSETS_DDL = """
CREATE TABLE IF NOT EXISTS _callstream_offsets (
  topic VARCHAR NOT NULL,
  kafka_partition INTEGER NOT NULL,
  next_offset BIGINT NOT NULL,
  updated_at TIMESTAMP NOT NULL,
  PRIMARY KEY (topic, kafka_partition)
)
"""

# Replaced rows whose Parquet part must be rewritten without them: (day, _load_seq of the old row),
# written in the same transaction as the new rows, so a crash before the next publish loses nothing.
DIRTY_DDL = """
CREATE TABLE IF NOT EXISTS _callstream_dirty (
  family VARCHAR NOT NULL,
  day DATE NOT NULL,
  part_seq BIGINT NOT NULL,
  seq BIGINT NOT NULL
)
"""


# Calls and chats erased with `callstream warehouse forget`: the sink never loads them again, and
# `files_done` is false until every Parquet file and the database file itself are rewritten without them.
FORGOTTEN_DDL = """
CREATE TABLE IF NOT EXISTS _callstream_forgotten (
  family VARCHAR NOT NULL,
  key VARCHAR NOT NULL,
  forgotten_at TIMESTAMP NOT NULL,
  files_done BOOLEAN NOT NULL,
  PRIMARY KEY (family, key)
)
"""


def last_load_seq(con: duckdb.DuckDBPyConnection, tables: Iterable[Table], above: int = 0) -> int:
    """The highest `_load_seq` in the given tables above `above` (`above` when none is): loads are
    appended in sequence, so zone maps skip every older row group."""
    return max(
        int(scalar(con, f"SELECT coalesce(max(_load_seq), ?) FROM {t.name} WHERE _load_seq > ?", [above, above]))
        for t in tables
    )
