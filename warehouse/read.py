"""The supported way to read the warehouse while the sink runs: DuckDB views over a Parquet snapshot.

DuckDB lets one process write a database file, and the sink is that process, so notebooks and
dashboards never open `warehouse.duckdb` while it runs. They read the Parquet files instead, through
a snapshot (every table as of one publish; see `warehouse.parquet`):

    from warehouse.read import connect
    con = connect()                      # CALLSTREAM_PARQUET_DIR, or ./data/parquet, or ../data/parquet
    con.sql("SELECT * FROM daily_agent_stats ORDER BY day, agent_id").df()

The connection is an in-memory DuckDB with one view per table (`calls`, `call_utterances`,
`call_tool_calls`, `chats`, `chat_messages`) and the reporting views. It keeps seeing the snapshot
it opened on, so a notebook's cells agree with each other; `refresh(con)` moves it to the newest one.
A snapshot stays readable for `CALLSTREAM_SNAPSHOT_RETENTION_SECONDS` (600) after a newer one exists.
`WHERE day ...` opens only the files of those days. One call's rows: `SELECT * FROM
call_utterances_of('call_...')` (and `calls_of`, `call_tool_calls_of`, `chats_of`, `chat_messages_of`)
finds the call's day in `call_days` and opens that day's files only; a plain `WHERE call_id = ?`
opens one file per day.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from warehouse.db import run
from warehouse.errors import WarehouseError
from warehouse.parquet_folder import Snapshot, current_snapshot, snapshot_files
from warehouse.schema import FAMILIES, KEY_DAYS, TABLES
from warehouse.views import create_views


def parquet_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The Parquet folder: `path`, else CALLSTREAM_PARQUET_DIR (or `.env`), else data/parquet here or above."""
    if path is not None:
        return Path(path)
    from warehouse.settings import SinkSettings

    configured = Path(SinkSettings().parquet_dir)
    if configured.is_absolute() or "CALLSTREAM_PARQUET_DIR" in os.environ:
        return configured
    # A notebook runs in notebooks/; the sink, started from the repo root, writes to ./data/parquet.
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / configured).is_dir():
            return folder / configured
    return configured


def _quote(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def refresh(con: duckdb.DuckDBPyConnection, path: str | os.PathLike[str] | None = None) -> str:
    """Point the views of `con` at the newest snapshot; return its generation."""
    root = parquet_dir(path)
    snap = current_snapshot(root)
    if snap is None:
        raise WarehouseError(
            f"no Parquet snapshot under {root.resolve()}: start `callstream sink` (it publishes one at start),"
            " or set CALLSTREAM_PARQUET_DIR to the folder it writes"
        )
    for t in TABLES:
        files = snapshot_files(snap, t.name)
        if files:
            cols = ", ".join(t.column_names)
            listing = ", ".join(_quote(f.resolve()) for f in files)
            run(
                con,
                f"CREATE OR REPLACE VIEW {t.name} AS SELECT {cols} FROM read_parquet([{listing}], "
                "hive_partitioning = true, hive_types = {'day': DATE})",
            )
        else:
            run(con, f"CREATE OR REPLACE VIEW {t.name} AS {t.empty_select()}")
    _lookups(con, snap)
    create_views(con)
    run(con, "CREATE OR REPLACE MACRO warehouse_snapshot() AS " + _quote(Path(snap.name)))
    return snap.name


def _lookups(con: duckdb.DuckDBPyConnection, snap: Snapshot) -> None:
    """`call_days`/`chat_days` (key -> day) and a macro per table, `<table>_of(key)`, that reads
    one call's (or chat's) rows from the files of its day only."""
    for index in KEY_DAYS:
        files = snapshot_files(snap, index.name)
        if files:
            listing = ", ".join(_quote(f.resolve()) for f in files)
            source = f"read_parquet([{listing}], hive_partitioning = false)"
        else:
            source = f"(SELECT CAST(NULL AS VARCHAR) AS {index.key}, CAST(NULL AS DATE) AS day WHERE false)"
        run(con, f"CREATE OR REPLACE VIEW {index.name} AS SELECT {index.key}, day FROM {source}")
        family = next(f for f in FAMILIES if f.parent is index.parent)
        for t in family.tables:
            run(
                con,
                f"CREATE OR REPLACE MACRO {t.name}_of(k) AS TABLE SELECT * FROM {t.name} "
                f"WHERE {index.key} = k AND day IN (SELECT day FROM {index.name} WHERE {index.key} = k)",
            )


def connect(path: str | os.PathLike[str] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views over the newest Parquet snapshot."""
    con = duckdb.connect(":memory:")
    run(con, "SET TimeZone = 'UTC'")
    # A snapshot's files never change (a change writes new ones), so their footers can be kept: a
    # lookup of one call then reads only the row groups whose key range holds it.
    run(con, "SET parquet_metadata_cache = true")
    refresh(con, path)
    return con
