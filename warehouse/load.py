"""The load transaction: one closed batch's rows, its ledger entry and its offsets, committed together.

A repeated delivery of a call replaces its row and all of its child rows. Each load is counted
before its COMMIT and again after it, against the load ledger (see `warehouse.ledger` for why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import duckdb
import pyarrow as pa

from warehouse import ledger
from warehouse.db import insert_rows, run, scalar, transaction
from warehouse.errors import WarehouseError
from warehouse.schema import Family, key_hash

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> offset


@dataclass(frozen=True, slots=True)
class Batch:
    """A closed batch, ready to load: Arrow tables per topic, and per partition the offsets of its
    first record and after its last."""

    tables: dict[str, dict[str, pa.Table]]
    first_offsets: Offsets
    next_offsets: Offsets
    records: int


@dataclass(frozen=True, slots=True)
class Written:
    """What one load did to each table: rows inserted, and stored rows it replaced (deleted)."""

    inserted: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)


def write_batch(
    con: duckdb.DuckDBPyConnection, families: dict[str, Family], batch: Batch, seq: int, published: int = 0
) -> Written:
    """Load `batch` as load `seq` in one transaction: its rows, its ledger entry and the offsets after
    it (and forget dirty days the publisher wrote up to `published`); then check that the commit
    kept every row."""
    written = Written()
    with transaction(con):
        for t, family_tables in batch.tables.items():
            w = replace_rows(con, families[t], family_tables, seq)
            written.inserted.update(w.inserted)
            written.deleted.update(w.deleted)
        if written.inserted:
            ledger.record(con, seq, written.inserted, batch.first_offsets)
        if published:
            run(con, "DELETE FROM _callstream_dirty WHERE seq <= ?", [published])
        now = datetime.now(UTC).replace(tzinfo=None)
        insert_rows(
            con,
            "INSERT OR REPLACE INTO _callstream_offsets VALUES",
            [(t, p, o, now) for (t, p), o in batch.next_offsets.items()],
        )
    check_committed(con, seq, written.inserted)
    return written


def replace_rows(con: duckdb.DuckDBPyConnection, family: Family, tables: dict[str, pa.Table], seq: int) -> Written:
    """In the caller's transaction: delete the stored versions of the batch's keys (parent and
    children), insert the new rows with load sequence `seq`, and note the replaced rows' Parquet parts
    and their loads' ledger counts. Returns the rows inserted and deleted per table (tables with rows only)."""
    key = family.parent.parent_key
    con.register("_batch_keys", tables[family.parent.name].select([key]))
    try:
        deleted = _delete_stored(con, family, seq)
    finally:
        con.unregister("_batch_keys")
    inserted: dict[str, int] = {}
    for t in family.tables:
        data = tables[t.name]
        if data.num_rows:
            con.register("_batch_rows", data)
            hashed = f", {key_hash(key)} AS _key_hash" if t.is_parent else ""
            try:
                # By name: a column a later schema version appended to the table stays NULL here,
                # wherever it sits.
                n = scalar(
                    con, f"INSERT INTO {t.name} BY NAME SELECT *, {int(seq)} AS _load_seq{hashed} FROM _batch_rows"
                )
            finally:
                con.unregister("_batch_rows")
            check_loaded(con, t.name, seq, data.num_rows, n)
            inserted[t.name] = data.num_rows
    return Written(inserted, deleted)


def stored_versions(con: duckdb.DuckDBPyConnection, family: Family) -> list[tuple[date, int]]:
    """(day, load) of every stored parent row whose key is in `_batch_keys`.

    Cost per batch: a scan of the 8-byte `_key_hash` column (no index: DuckDB would keep it whole in
    memory), then a fetch by row id of the few rows whose hash matched, whose keys decide (two keys
    may share a hash). Exact: every parent row carries its key's hash, computed by the same SQL.
    """
    parent, key = family.parent.name, family.parent.parent_key
    hits = run(
        con,
        f"SELECT p.rowid FROM {parent} p SEMI JOIN (SELECT {key_hash(key)} AS h FROM _batch_keys) b "
        "ON p._key_hash = b.h",
    )
    if not hits:
        return []
    rowids = ", ".join(str(int(r)) for (r,) in hits)
    return [
        (d, int(s))
        for d, s in run(
            con,
            f"SELECT DISTINCT day, _load_seq FROM {parent} "
            f"WHERE rowid IN ({rowids}) AND {key} IN (SELECT {key} FROM _batch_keys)",
        )
    ]


def _delete_stored(con: duckdb.DuckDBPyConnection, family: Family, seq: int) -> dict[str, int]:
    """Delete the stored versions of the keys in `_batch_keys` from every table of the family; note
    their Parquet parts as dirty and take them off their loads' ledger counts."""
    found = stored_versions(con, family)
    if not found:
        return {}
    insert_rows(con, "INSERT INTO _callstream_dirty VALUES", [(family.name, d, s, seq) for d, s in found])
    key = family.parent.parent_key
    # A key's rows in every table come from the load that wrote its parent row, so naming those
    # loads lets zone maps skip all other row groups of the (large) child tables.
    loads = ", ".join(str(s) for s in sorted({s for _, s in found}))
    where = f"_load_seq IN ({loads}) AND {key} IN (SELECT {key} FROM _batch_keys)"
    deleted: dict[str, int] = {}
    for t in (*family.children, family.parent):
        ledger.note_replaced(con, t, where)
        n = int(scalar(con, f"DELETE FROM {t.name} WHERE {where}") or 0)
        if n:
            deleted[t.name] = n
    return deleted


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
