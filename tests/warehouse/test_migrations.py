"""Schema versions: a new file is stamped, a file of an older schema is migrated at the sink's start
and then loads, and a file newer than the code is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from tests.support.paths import REPO
from warehouse.db import run, scalar
from warehouse.errors import WarehouseError
from warehouse.load import Batch, write_batch
from warehouse.migrations import MIGRATIONS, Migration, migrate, version
from warehouse.schema import CALL_FAMILY

V1_SQL = REPO / "tests" / "warehouse" / "schema_v1.sql"
CALLS_TOPIC = "t.call_analyzed"


def _v1_file(path: Path) -> duckdb.DuckDBPyConnection:
    """A warehouse as the first release made it: its tables, no schema version."""
    con = duckdb.connect(str(path))
    sql = "\n".join(line for line in V1_SQL.read_text().splitlines() if not line.startswith("--"))
    for statement in sql.split(";"):
        if statement.strip():
            run(con, statement)
    return con


def _load(con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table], seq: int) -> dict[str, int]:
    batch = Batch({CALLS_TOPIC: tables}, {(CALLS_TOPIC, 0): 0}, {(CALLS_TOPIC, 0): 4}, records=4)
    return write_batch(con, {CALLS_TOPIC: CALL_FAMILY}, batch, seq)


def test_a_new_file_gets_every_table_and_the_newest_version(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    assert migrate(con) == [MIGRATIONS[-1].version]
    assert version(con) == MIGRATIONS[-1].version
    assert migrate(con) == []  # the next start finds it current
    assert scalar(con, "SELECT count(*) FROM daily_agent_stats") == 0


def test_a_first_release_file_is_migrated_and_loads(
    tmp_path: Path, family_batch: Callable[..., dict[str, pa.Table]]
) -> None:
    con = _v1_file(tmp_path / "old.duckdb")
    old_rows = family_batch(CALL_FAMILY, 4)
    _load(con, old_rows, 1)  # rows the old release loaded
    assert version(con) == 1
    migrate(con)
    assert version(con) == MIGRATIONS[-1].version
    # Redeliveries of the same calls replace theirs; new calls are added beside them.
    _load(con, old_rows, 2)
    _load(con, family_batch(CALL_FAMILY, 4), 3)
    assert scalar(con, "SELECT count(*) FROM calls") == 8
    assert scalar(con, "SELECT count(*) FROM calls WHERE _load_seq = 1") == 0


def test_a_column_a_migration_appends_leaves_loading_intact(
    tmp_path: Path, family_batch: Callable[..., dict[str, pa.Table]]
) -> None:
    def add_review(con: duckdb.DuckDBPyConnection) -> None:
        run(con, "ALTER TABLE calls ADD COLUMN reviewed BOOLEAN DEFAULT false")

    con = _v1_file(tmp_path / "old.duckdb")
    assert migrate(con, (*MIGRATIONS, Migration(MIGRATIONS[-1].version + 1, "review flag", add_review))) == [
        MIGRATIONS[-1].version + 1
    ]
    assert _load(con, family_batch(CALL_FAMILY, 4), 1)["calls"] == 4
    assert run(con, "SELECT DISTINCT reviewed FROM calls") == [(False,)]


def test_a_file_of_a_newer_release_is_refused_with_what_to_do(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    migrate(con)
    run(con, "INSERT INTO _callstream_schema (version, note) VALUES (99, 'from the future')")
    with pytest.raises(WarehouseError, match="schema version 99, newer than this callstream's"):
        migrate(con)
