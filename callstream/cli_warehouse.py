"""`callstream warehouse ...`: upkeep of the DuckDB warehouse and its Parquet folder (forget, compact)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
def warehouse() -> None:
    """Upkeep of the DuckDB warehouse (CALLSTREAM_WAREHOUSE) and its Parquet files (CALLSTREAM_PARQUET_DIR)."""


@warehouse.command("forget")
@click.option("--call-id", "call_ids", multiple=True, metavar="ID", help="A call to erase (repeatable).")
@click.option("--chat-id", "chat_ids", multiple=True, metavar="ID", help="A chat to erase (repeatable).")
@click.option(
    "--number",
    "numbers",
    multiple=True,
    metavar="PHONE",
    help="Erase every call from or to this number, as sent (+14155551234) or hashed with "
    "CALLSTREAM_PHONE_HASH_KEY (repeatable).",
)
@click.option(
    "--include-masked",
    is_flag=True,
    help="With --number: also erase calls whose masked number (****1234) ends in the same four digits, "
    "which may be other callers' calls.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be erased; change nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def forget(
    call_ids: tuple[str, ...],
    chat_ids: tuple[str, ...],
    numbers: tuple[str, ...],
    include_masked: bool,
    dry_run: bool,
    no_progress: bool,
) -> None:
    """Erase calls and chats from the warehouse for good (a caller's right to be forgotten).

    Deletes their rows from every table (calls, call_utterances, call_tool_calls; chats,
    chat_messages), rewrites every Parquet file that holds them, the snapshots' included (readers
    keep working), and rewrites the DuckDB file itself without them (it needs room for a copy). The
    erased ids are recorded, and the sink never loads them again.

    Stop the sink first: DuckDB allows one writer, and forget refuses while the sink holds the file.
    Kafka keeps the raw events until its retention removes them (see the README, "Personal data").
    Without arguments it finishes a forget that was interrupted.
    """
    from tqdm import tqdm

    from warehouse.forget import Selection
    from warehouse.forget import forget as run_forget
    from warehouse.settings import SinkSettings

    sel = Selection(call_ids, chat_ids, numbers, include_masked)
    with tqdm(unit="file", desc="forget", disable=no_progress or dry_run, file=sys.stderr, delay=0.5) as bar:
        report = run_forget(SinkSettings(), sel, dry_run=dry_run, progress=bar.update)
    if not sel and not report.plan.total_keys():
        raise click.UsageError("nothing to forget: give --call-id, --chat-id or --number")
    for line in report.lines():
        click.echo(line)


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
