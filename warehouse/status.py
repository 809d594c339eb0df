"""`warehouse.status.json` beside the database: row counts and the newest snapshot, for readers that
cannot open the DuckDB file while the sink holds its lock (`callstream up` waits on it)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import orjson

from warehouse.db import scalar
from warehouse.parquet import current_snapshot
from warehouse.schema import TABLES


def status_path(warehouse: str) -> Path:
    """Where the sink publishes its row counts after every commit."""
    return Path(warehouse).with_suffix(".status.json")


def write_status(
    con: duckdb.DuckDBPyConnection, warehouse: str, parquet_dir: str, records: int, dead_letters: int
) -> None:
    counts = {t.name: scalar(con, f"SELECT count(*) FROM {t.name}") for t in TABLES}
    snap = current_snapshot(Path(parquet_dir))
    status = {
        "warehouse": str(Path(warehouse).resolve()),
        "tables": counts,
        "records": records,
        "dead_letters": dead_letters,
        "parquet_dir": str(Path(parquet_dir).resolve()),
        "parquet_snapshot": snap.name if snap else None,
        "updated_at": datetime.now(UTC).isoformat(),
    }
    path = status_path(warehouse)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(status))
    tmp.replace(path)
