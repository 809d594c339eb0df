"""Schema versions of a warehouse file, and the ordered migrations that bring an older file up to date.

A new file gets this release's tables and is stamped with the newest version. A file made by an
older release has its missing migrations applied in order at the sink's start, each in one
transaction with the row that records it, so a crash leaves the file at one version or the next.
A file from before versioning (tables, no `_callstream_schema`) is version 1. Reporting views are
recreated at every start: they hold no data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import duckdb

from warehouse import ledger
from warehouse.db import run, scalar, transaction
from warehouse.errors import WarehouseError
from warehouse.schema import DIRTY_DDL, FORGOTTEN_DDL, OFFSETS_DDL, TABLES, key_hash
from warehouse.views import create_views

log = logging.getLogger(__name__)

VERSION_DDL = """
CREATE TABLE IF NOT EXISTS _callstream_schema (
  version INTEGER NOT NULL,
  applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
  note VARCHAR NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    note: str  # what it changes, for the version table and the log
    apply: Callable[[duckdb.DuckDBPyConnection], None]


def _nothing(con: duckdb.DuckDBPyConnection) -> None:
    """Version 1 is the schema of the first release: a file of it already holds everything."""


def _forgotten(con: duckdb.DuckDBPyConnection) -> None:
    run(con, FORGOTTEN_DDL)


def _parents_without_index(con: duckdb.DuckDBPyConnection) -> None:
    """calls and chats lose their PRIMARY KEY (DuckDB keeps its index whole in memory once used: some
    70 bytes a call, past the sink's memory limit within weeks) and gain `_key_hash`, which the
    replace check scans instead. DuckDB cannot drop a constraint, so each table is copied, in the
    order of its rows (loads stay in sequence, which keeps zone maps on `_load_seq` useful)."""
    kept = scalar(con, "SELECT current_setting('preserve_insertion_order')")
    run(con, "SET preserve_insertion_order = true")
    try:
        for table, key in (("calls", "call_id"), ("chats", "chat_id")):
            not_null = run(
                con,
                "SELECT unnest(constraint_column_names) FROM duckdb_constraints() "
                "WHERE table_name = ? AND constraint_type = 'NOT NULL'",
                [table],
            )
            run(con, f"CREATE TABLE _callstream_copy AS SELECT *, {key_hash(key)} AS _key_hash FROM {table}")
            run(con, f"DROP TABLE {table}")
            run(con, f"ALTER TABLE _callstream_copy RENAME TO {table}")
            for (column,) in [*not_null, ("_key_hash",)]:
                run(con, f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL")
    finally:
        run(con, f"SET preserve_insertion_order = {'true' if kept else 'false'}")


# Append only: a released migration never changes, a new schema change is a new entry.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "tables, offsets, dirty days and load ledger of the first release", _nothing),
    Migration(2, "the list of calls and chats erased by `callstream warehouse forget`", _forgotten),
    Migration(
        3, "calls and chats without a primary key index, with a key hash for the replace check", _parents_without_index
    ),
)


def version(con: duckdb.DuckDBPyConnection) -> int:
    """The file's schema version: 0 for an empty file, 1 for one from before versioning."""
    tables = {name for (name,) in run(con, "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'")}
    if "_callstream_schema" in tables:
        return int(scalar(con, "SELECT coalesce(max(version), 0) FROM _callstream_schema"))
    return 1 if "calls" in tables else 0


def migrate(con: duckdb.DuckDBPyConnection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Bring the file to the newest version; return the versions applied (empty when it was current)."""
    run(con, "SET TimeZone = 'UTC'")
    newest = migrations[-1].version
    found = version(con)
    if found > newest:
        raise WarehouseError(
            f"the warehouse has schema version {found}, newer than this callstream's ({newest}): "
            "upgrade callstream, or set CALLSTREAM_WAREHOUSE to another file"
        )
    applied: list[int] = []
    if found == 0:
        with transaction(con):
            create_all(con)
            _stamp(con, newest, "created")
        applied.append(newest)
    elif not _versioned(con):
        with transaction(con):
            ledger.create(con)  # the first release's files may predate the load ledger
            _stamp(con, 1, migrations[0].note)
    for m in migrations:
        if found != 0 and m.version > found:
            with transaction(con):
                m.apply(con)
                _stamp(con, m.version, m.note)
            log.info("warehouse: migrated to schema version %d (%s)", m.version, m.note)
            applied.append(m.version)
    create_views(con)
    return applied


def _versioned(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(scalar(con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = '_callstream_schema'"))


def _stamp(con: duckdb.DuckDBPyConnection, version: int, note: str) -> None:
    run(con, VERSION_DDL)
    run(con, "INSERT INTO _callstream_schema (version, note) VALUES (?, ?)", [version, note])


def create_all(con: duckdb.DuckDBPyConnection) -> None:
    """Every table of this release's schema (idempotent); the views come with `migrate`."""
    run(con, "SET TimeZone = 'UTC'")
    for t in TABLES:
        run(con, t.ddl())
    run(con, OFFSETS_DDL)
    run(con, DIRTY_DDL)
    run(con, FORGOTTEN_DDL)
    ledger.create(con)
