"""Reading the lake from DuckDB: the five tables, as of one commit, through pyiceberg scans to Arrow.

    from warehouse.lake.read import connect
    lake = connect()                     # CALLSTREAM_LAKE_* from the environment or .env
    lake.sql("SELECT agent_id, count(*) FROM calls GROUP BY ALL").df()
    lake.refresh()                       # the newest commit

The catalog's pointers of all tables are read in one query, and every commit of the sinks moves them
together, so the tables always agree with each other (no call without its utterances). Each table
is registered in an in-memory DuckDB connection (`lake.con`) as an Arrow table.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
from pyiceberg.table import Table

from warehouse.lake.catalog import LakeCatalog, open_catalog
from warehouse.lake.settings import LakeSettings
from warehouse.schema import TABLES

NAMES = [t.name for t in TABLES]


def arrow(catalog: LakeCatalog, names: list[str] | None = None) -> dict[str, pa.Table]:
    """The rows of the lake's tables as of one commit."""
    found = catalog.load_tables(names or NAMES)
    return {name: t.scan().to_arrow() for name, t in found.items()}


class LakeReader:
    """A DuckDB connection over one commit of the lake."""

    def __init__(self, catalog: LakeCatalog) -> None:
        self.catalog = catalog
        self.con = duckdb.connect()
        self.tables: dict[str, Table] = {}
        self.snapshots: dict[str, int] = {}
        self.refresh()

    def refresh(self) -> dict[str, int]:
        """Move to the newest commit; returns each table's snapshot id."""
        found = self.tables = self.catalog.load_tables(NAMES, self.tables)
        for name, t in found.items():
            self.con.register(name, t.scan().to_arrow())
        self.snapshots = {name: (t.metadata.current_snapshot_id or 0) for name, t in found.items()}
        return self.snapshots

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        return self.con.sql(query)

    def close(self) -> None:
        self.con.close()


def connect(settings: LakeSettings | None = None, catalog: LakeCatalog | None = None) -> LakeReader:
    """The lake's tables in DuckDB as of now (`refresh()` for newer commits)."""
    return LakeReader(catalog or open_catalog(settings or LakeSettings()))
