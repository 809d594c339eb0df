"""The load transaction: one closed batch's rows, its ledger entry and its offsets, committed together.

A repeated delivery of a call replaces its row and all of its child rows. Each load is counted
before its COMMIT and again after it, against the load ledger (see `warehouse.ledger` for why).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa

from warehouse import ledger
from warehouse.db import insert_rows, run, scalar, transaction
from warehouse.errors import WarehouseError
from warehouse.schema import Family

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> offset


@dataclass(frozen=True, slots=True)
class Batch:
    """A closed batch, ready to load: Arrow tables per topic, and per partition the offsets of its
    first record and after its last."""

    tables: dict[str, dict[str, pa.Table]]
    first_offsets: Offsets
    next_offsets: Offsets
    records: int


def write_batch(
    con: duckdb.DuckDBPyConnection, families: dict[str, Family], batch: Batch, seq: int, published: int = 0
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
                # By name: a column a later schema version appended to the table stays NULL here,
                # wherever it sits.
                inserted = scalar(
                    con, f"INSERT INTO {t.name} BY NAME SELECT *, {int(seq)} AS _load_seq FROM _batch_rows"
                )
            finally:
                con.unregister("_batch_rows")
            check_loaded(con, t.name, seq, data.num_rows, inserted)
            rows[t.name] = data.num_rows
    return rows


def check_loaded(con: duckdb.DuckDBPyConnection, table: str, seq: int, want: int, inserted: Any) -> None:
    """Raise (so the caller rolls back) unless the table holds exactly `want` rows of load `seq`:
    offsets committed over a short INSERT would skip the missing rows for good."""
    stored = load_rows(con, table, seq)
    if inserted != want or stored != want:
        raise WarehouseError(
            f"load {seq} into {table}: the batch holds {want} rows, the INSERT reported {inserted} and the "
            f"table holds {stored}; rolled back, so nothing of this batch is stored and its offsets do not move"
        )


def check_committed(con: duckdb.DuckDBPyConnection, seq: int, rows: dict[str, int]) -> None:
    """After COMMIT: raise (so the sink stops) unless each table holds the rows load `seq` inserted.

    Stopping is enough: the ledger committed with the rows says how many there must be, so the next
    start finds the load short and reloads it from Kafka; carrying on would leave the gap until then.
    """
    for table, want in rows.items():
        stored = load_rows(con, table, seq)
        if stored != want:
            raise WarehouseError(
                f"load {seq} into {table}: {want} rows inserted, but the table holds {stored} after COMMIT; stopping, "
                "the next start reloads this load from Kafka"
            )


def load_rows(con: duckdb.DuckDBPyConnection, table: str, seq: int) -> int:
    # Cheap on a large table: loads are appended in sequence, so zone maps skip the older row groups.
    return int(scalar(con, f"SELECT count(*) FROM {table} WHERE _load_seq = ?", [seq]))
