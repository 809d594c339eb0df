"""Bringing a DuckDB file to the current schema: the tables, the sink's bookkeeping and the views."""

from __future__ import annotations

import duckdb

from warehouse import ledger
from warehouse.db import run
from warehouse.schema import DIRTY_DDL, OFFSETS_DDL, TABLES
from warehouse.views import create_views


def create_all(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table and reporting view (idempotent)."""
    run(con, "SET TimeZone = 'UTC'")
    for t in TABLES:
        run(con, t.ddl())
    run(con, OFFSETS_DDL)
    run(con, DIRTY_DDL)
    ledger.create(con)
    create_views(con)
