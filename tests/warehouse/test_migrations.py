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
from warehouse.schema import CALL_FAMILY, python_key_hash

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
    return write_batch(con, {CALLS_TOPIC: CALL_FAMILY}, batch, seq).inserted


def test_a_new_file_gets_every_table_and_the_newest_version(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    assert migrate(con) == [MIGRATIONS[-1].version]
    assert version(con) == MIGRATIONS[-1].version
    assert migrate(con) == []  # the next start finds it current
    assert scalar(con, "SELECT count(*) FROM daily_agent_stats") == 0


def _load_as_v1(con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table], seq: int) -> None:
    """Rows as the first release inserted them: every column in order, then the load sequence."""
    for name, data in tables.items():
        con.register("_rows", data)
        run(con, f"INSERT INTO {name} SELECT *, {seq} FROM _rows")
        con.unregister("_rows")


def test_a_first_release_file_with_rows_is_migrated_and_loads_and_replaces(
    tmp_path: Path, family_batch: Callable[..., dict[str, pa.Table]]
) -> None:
    con = _v1_file(tmp_path / "old.duckdb")
    old_rows = family_batch(CALL_FAMILY, 4)
    kept_rows = family_batch(CALL_FAMILY, 3)
    _load_as_v1(con, old_rows, 1)  # rows the old release loaded
    _load_as_v1(con, kept_rows, 2)
    utterances = scalar(con, "SELECT count(*) FROM call_utterances")
    assert version(con) == 1
    assert migrate(con) == [m.version for m in MIGRATIONS[1:]]
    assert version(con) == MIGRATIONS[-1].version
    # No index any more (it would grow in memory with every call); every row has its key's hash.
    keyed = "SELECT table_name FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' ORDER BY 1"
    assert not {"calls", "chats"} & {t for (t,) in run(con, keyed)}
    assert [k for (k,) in run(con, "SELECT call_id FROM calls ORDER BY call_id")] == sorted(
        old_rows["calls"]["call_id"].to_pylist() + kept_rows["calls"]["call_id"].to_pylist()
    )
    for call_id, stored in run(con, "SELECT call_id, _key_hash FROM calls"):
        assert stored == python_key_hash(call_id)
    assert run(con, "SELECT DISTINCT _load_seq FROM calls ORDER BY 1") == [(1,), (2,)]  # rows kept in load order
    # Redeliveries of the old calls replace theirs, children too; new calls are added beside them.
    assert _load(con, old_rows, 3) == {n: t.num_rows for n, t in old_rows.items() if t.num_rows}
    _load(con, family_batch(CALL_FAMILY, 4), 4)
    assert scalar(con, "SELECT count(*) FROM calls") == 11
    for t in CALL_FAMILY.tables:
        assert scalar(con, f"SELECT count(*) FROM {t.name} WHERE _load_seq = 1") == 0, t.name
    assert (
        scalar(con, "SELECT count(*) FROM call_utterances WHERE _load_seq = 2") == kept_rows["call_utterances"].num_rows
    )
    assert scalar(con, "SELECT count(*) FROM call_utterances WHERE _load_seq <= 3") == utterances
    assert run(con, "SELECT DISTINCT family, part_seq FROM _callstream_dirty") == [("calls", 1)]
    assert scalar(con, "SELECT count(*) FROM daily_agent_stats") > 0


def test_a_column_a_migration_appends_leaves_loading_intact(
    tmp_path: Path, family_batch: Callable[..., dict[str, pa.Table]]
) -> None:
    def add_review(con: duckdb.DuckDBPyConnection) -> None:
        run(con, "ALTER TABLE calls ADD COLUMN reviewed BOOLEAN DEFAULT false")

    con = _v1_file(tmp_path / "old.duckdb")
    assert migrate(con, (*MIGRATIONS, Migration(MIGRATIONS[-1].version + 1, "review flag", add_review))) == [
        *(m.version for m in MIGRATIONS[1:]),
        MIGRATIONS[-1].version + 1,
    ]
    assert _load(con, family_batch(CALL_FAMILY, 4), 1)["calls"] == 4
    assert run(con, "SELECT DISTINCT reviewed FROM calls") == [(False,)]


def test_a_first_release_file_gets_the_forgotten_list(tmp_path: Path) -> None:
    con = _v1_file(tmp_path / "old.duckdb")
    assert 2 in migrate(con)
    run(con, "INSERT INTO _callstream_forgotten VALUES ('calls', 'c1', now()::TIMESTAMP, false)")
    assert run(con, "SELECT family, key, files_done FROM _callstream_forgotten") == [("calls", "c1", False)]


def test_a_file_of_a_newer_release_is_refused_with_what_to_do(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    migrate(con)
    run(con, "INSERT INTO _callstream_schema (version, note) VALUES (99, 'from the future')")
    with pytest.raises(WarehouseError, match="schema version 99, newer than this callstream's"):
        migrate(con)


def _columns(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    return run(
        con,
        "SELECT table_name, column_index, column_name, data_type, is_nullable FROM duckdb_columns() "
        "WHERE schema_name = 'main' ORDER BY table_name, column_index",
    )


def test_a_migrated_file_has_the_schema_of_a_new_one(tmp_path: Path) -> None:
    old = _v1_file(tmp_path / "old.duckdb")
    migrate(old)
    new = duckdb.connect(str(tmp_path / "new.duckdb"))
    migrate(new)
    assert _columns(old) == _columns(new)
