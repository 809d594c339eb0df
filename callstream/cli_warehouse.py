"""`callstream warehouse ...`: upkeep of the DuckDB warehouse's Parquet folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def warehouse() -> None:
    """The DuckDB warehouse (CALLSTREAM_WAREHOUSE) and its Parquet folder (CALLSTREAM_PARQUET_DIR): upkeep."""


@warehouse.command("compact")
@click.option(
    "--retain",
    type=float,
    default=None,
    help="Seconds a replaced file stays for readers of older snapshots "
    "(default: CALLSTREAM_SNAPSHOT_RETENTION_SECONDS, 600).",
)
def compact(retain: float | None) -> None:
    """Merge each day's Parquet parts into one file per table, sorted by key, and delete the files
    replaced longer than --retain seconds ago.

    Safe while the sink runs and readers read: a day at a time under the folder's lock, and readers
    of older snapshots keep their files for --retain seconds. The sink merges by itself too (a day's
    small parts as it publishes, a past day into one part); this does every day now, e.g. after a
    backfill or before a backup.
    """
    from warehouse.compaction import compact as compact_folder
    from warehouse.errors import WarehouseError
    from warehouse.settings import SinkSettings

    cfg = SinkSettings()
    root = Path(cfg.parquet_dir)
    if not root.is_dir():
        raise WarehouseError(
            f"no Parquet folder at {root.resolve()}: set CALLSTREAM_PARQUET_DIR to the folder the sink writes"
        )
    stats = compact_folder(
        root,
        cfg.snapshot_retention_seconds if retain is None else retain,
        cfg.parquet_compression,
        memory_limit=cfg.duckdb_memory_limit,
        say=lambda m: click.echo(m, err=True),
    )
    click.echo(f"warehouse compact: {stats.summary()}")


def register(main: click.Group) -> None:
    main.add_command(warehouse)
