"""Sink settings: `CALLSTREAM_*` variables (and `.env`), read once at start-up."""

from __future__ import annotations

from warehouse.personal_data import PersonalDataSettings


class SinkSettings(PersonalDataSettings):
    warehouse: str = "data/warehouse.duckdb"
    parquet_dir: str = "data/parquet"
    # Kafka's committed offsets only show lag to operators; the sink resumes from DuckDB's.
    group_id: str = "callstream-warehouse"
    # A batch is loaded when it has this many records or bytes, or is this old (rows are queryable
    # in DuckDB within batch_max_seconds, and in Parquet after the next publish). Fewer, bigger
    # commits cost less CPU, and decoded rows are a fraction of the JSON, so memory barely moves.
    batch_max_records: int = 2000
    batch_max_bytes: int = 64 * 1024 * 1024
    batch_max_seconds: float = 1.0
    # Parquet: the shortest pause between two publishes, and how long a superseded snapshot stays
    # readable (a reader's connection sees one snapshot; reconnect for newer data within this time).
    parquet_min_interval_seconds: float = 2.0
    snapshot_retention_seconds: float = 600.0
    parquet_compression: str = "zstd"
    # How often the running sink checkpoints DuckDB and trims the load ledger to the loads since.
    checkpoint_seconds: float = 30.0
    # DuckDB's own buffer limit; with the Kafka fetch queue this bounds the sink's memory.
    duckdb_memory_limit: str = "128MB"
    duckdb_threads: int = 2
    # Kafka prefetch; the consuming thread never stops for the writer long, so a fraction of a batch will do.
    fetch_queue_kbytes: int = 16384
    # The sink's Prometheus endpoint (GET /metrics: consumer lag per partition, records loaded): off
    # unless a port is set, so that several sinks on one machine never fight over one.
    sink_metrics_port: int | None = None
    sink_metrics_host: str = "127.0.0.1"

    def consumer_group(self) -> str:
        """The group whose committed offsets show the sink's lag (the sink resumes from DuckDB's own)."""
        return f"{self.group_id}-{self.topic_prefix}"
