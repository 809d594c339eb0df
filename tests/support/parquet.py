"""Helpers of the Parquet tests: calls loaded straight into a warehouse file, and the reader's rows
compared with DuckDB's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb

from warehouse.db import run
from warehouse.load import replace_rows
from warehouse.read import connect
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CALL_FAMILY

DAY_MS = 86_400_000
T0 = 1_790_000_000_000


def load_calls(con: duckdb.DuckDBPyConnection, seq: int, bodies: list[bytes]) -> None:
    """Analyzed-call bodies loaded as load `seq`, as the sink loads a batch (without Kafka)."""
    fb = FamilyBatch(CALL_FAMILY)
    for i, b in enumerate(bodies):
        fb.add(b, Source(0, i, None, int(time.time() * 1000)))
    run(con, "BEGIN TRANSACTION")
    replace_rows(con, CALL_FAMILY, fb.tables(), seq)
    run(con, "COMMIT")


def rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple]:
    t = next(t for t in CALL_FAMILY.tables if t.name == table)
    return con.execute(f"SELECT {', '.join(t.column_names)} FROM {table} ORDER BY {', '.join(t.key)}").fetchall()


def assert_same(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """The newest snapshot, and a plain glob of the live parts, hold exactly the call tables' rows."""
    reader = connect(root)
    for t in CALL_FAMILY.tables:
        assert rows(reader, t.name) == rows(con, t.name), t.name
        glob = root / t.name / "**" / "*.parquet"
        n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true)").fetchall()
        assert n == con.execute(f"SELECT count(*) FROM {t.name}").fetchall(), t.name
    reader.close()


def cli_env(parquet: Path) -> dict[str, str]:
    """The environment of a `callstream warehouse ...` process on this Parquet folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    return {**env, "CALLSTREAM_PARQUET_DIR": str(parquet), "CALLSTREAM_SNAPSHOT_RETENTION_SECONDS": "3600"}
