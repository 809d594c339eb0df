"""`warehouse.status.json` beside the database: row counts and the newest snapshot, for readers that
cannot open the DuckDB file while the sink holds its lock (`callstream up` waits on it)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from warehouse.parquet_folder import current_generation


def status_path(warehouse: str) -> Path:
    """Where the sink publishes its row counts after every commit."""
    return Path(warehouse).with_suffix(".status.json")


def write_status(warehouse: str, parquet_dir: str, counts: dict[str, int], records: int, dead_letters: int) -> None:
    """Write the status file: `counts` are the rows per table (the sink keeps them up to date per load)."""
    status = {
        "warehouse": str(Path(warehouse).resolve()),
        "tables": dict(counts),
        "records": records,
        "dead_letters": dead_letters,
        "parquet_dir": str(Path(parquet_dir).resolve()),
        "parquet_snapshot": current_generation(Path(parquet_dir)),
        "updated_at": datetime.now(UTC).isoformat(),
    }
    path = status_path(warehouse)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(status))
    tmp.replace(path)
