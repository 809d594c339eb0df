"""The warehouse tables: DuckDB DDL and the matching Arrow schemas, defined once."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sql: str
    arrow: pa.DataType


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    # Child tables are replaced together with their parent, matched on `parent_key`.
    parent_key: str

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow) for c in self.columns])

    def ddl(self) -> str:
        cols = ",\n  ".join(f"{c.name} {c.sql}" for c in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  {cols},\n  PRIMARY KEY ({', '.join(self.key)})\n)"


def _c(name: str, sql: str) -> Column:
    arrow = {
        "VARCHAR": pa.string(), "JSON": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(),
        "DOUBLE": pa.float64(), "BOOLEAN": pa.bool_(), "TIMESTAMPTZ": pa.timestamp("ms", tz="UTC"),
        "TIMESTAMP": pa.timestamp("ms"),
    }[sql.split()[0]]
    return Column(name, sql, arrow)


# Common tail of every table: where the row came from, so any row can be traced to its message.
_SOURCE = (
    _c("event_received_at", "TIMESTAMP"),
    _c("kafka_partition", "INTEGER"),
    _c("kafka_offset", "BIGINT"),
    _c("loaded_at", "TIMESTAMP"),
)

CALLS = Table(
    "calls",
    (
        _c("call_id", "VARCHAR NOT NULL"),
        _c("agent_id", "VARCHAR"),
        _c("agent_version", "BIGINT"),
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
        _c("transcript", "VARCHAR"),
        _c("recording_url", "VARCHAR"),
        _c("metadata", "JSON"),
        _c("dynamic_variables", "JSON"),
        _c("custom_analysis_data", "JSON"),
        _c("opted_out", "BOOLEAN"),
        *_SOURCE,
    ),
    key=("call_id",),
    parent_key="call_id",
)

TABLES: tuple[Table, ...] = (CALLS,)

OFFSETS_DDL = """
CREATE TABLE IF NOT EXISTS _callstream_offsets (
  topic VARCHAR NOT NULL,
  kafka_partition INTEGER NOT NULL,
  next_offset BIGINT NOT NULL,
  updated_at TIMESTAMP NOT NULL,
  PRIMARY KEY (topic, kafka_partition)
)
"""


def create_all(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table (idempotent)."""
    con.execute("SET TimeZone = 'UTC'")
    for t in TABLES:
        con.execute(t.ddl())
    con.execute(OFFSETS_DDL)
