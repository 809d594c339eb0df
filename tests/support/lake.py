"""The lake seen by the tests: its tables copied into a DuckDB file, so that the DuckDB sink's
audit (tests/support/audit.py) checks the lake with the same queries, and its stored offsets."""

from __future__ import annotations

from pathlib import Path

import duckdb

from tests.support.audit import TopicLog, database_problems
from warehouse.lake import offsets
from warehouse.lake.catalog import LakeCatalog
from warehouse.lake.read import connect
from warehouse.schema import FAMILIES


def stored_offsets(catalog: LakeCatalog) -> offsets.Offsets:
    """The offsets a restarted sink resumes from: the highest per partition across the parents' snapshots."""
    parents = catalog.load_tables([f.parent.name for f in FAMILIES])
    out: offsets.Offsets = {}
    for t in parents.values():
        offsets.merge(out, offsets.stored(t.metadata))
    return out


def copy_to_duckdb(catalog: LakeCatalog, db: Path) -> offsets.Offsets:
    """Write one commit of the lake into a DuckDB file; return the offsets of that same commit."""
    reader = connect(catalog=catalog)
    try:
        db.unlink(missing_ok=True)
        reader.con.execute(f"ATTACH '{db}' AS copy")
        for name in reader.snapshots:
            reader.con.execute(f"CREATE TABLE copy.{name} AS SELECT * FROM {name}")
        reader.con.execute("DETACH copy")
        got: offsets.Offsets = {}
        for f in FAMILIES:  # the offsets of the very commit that was copied
            offsets.merge(got, offsets.stored(reader.tables[f.parent.name].metadata))
        return got
    finally:
        reader.close()


def lake_problems(catalog: LakeCatalog, log: TopicLog, work: Path) -> list[str]:
    """Every way the lake breaks the sink's invariant against the topics (empty: it holds)."""
    db = work / "lake-copy.duckdb"
    stored = copy_to_duckdb(catalog, db)
    log.read_until(stored)
    problems = database_problems(db, stored, log.last_deliveries)
    if log.dead_letters:
        problems.append(f"{len(log.dead_letters)} dead letters: {log.dead_letters[:10]}")
    return problems


def rows(db_or_con: Path | duckdb.DuckDBPyConnection, table: str, columns: list[str], order: list[str]) -> list[tuple]:
    con = duckdb.connect(str(db_or_con), read_only=True) if isinstance(db_or_con, Path) else db_or_con
    try:
        return con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {', '.join(order)}").fetchall()
    finally:
        if isinstance(db_or_con, Path):
            con.close()
