"""Sink settings: `CALLSTREAM_*` variables (and `.env`), read once at start-up."""

from __future__ import annotations

from callstream.settings import CommonSettings


class SinkSettings(CommonSettings):
    warehouse: str = "data/warehouse.duckdb"
    parquet_dir: str = "data/parquet"
    group_id: str = "callstream-warehouse"
    batch_max_records: int = 2000
    batch_max_seconds: float = 1.0
