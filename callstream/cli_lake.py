"""The lake's commands: `callstream s3 start|stop|status`, `callstream lake maintain|status`, and the
lake sink that `callstream sink` runs when CALLSTREAM_LAKE_WAREHOUSE and CALLSTREAM_LAKE_CATALOG are set."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from pydantic import ValidationError

from callstream.locals3 import DEFAULT_PORT, LocalS3, default_home
from kernel.errors import CallstreamError
from kernel.settings import config_problem

if TYPE_CHECKING:
    from warehouse.lake.catalog import LakeCatalog


def _fail(exc: Exception) -> click.ClickException:
    if isinstance(exc, ValidationError):
        return click.ClickException(config_problem(exc))
    return click.ClickException(str(exc))


# -- s3 -----------------------------------------------------------------------------------------


@click.group()
def s3() -> None:
    """A local S3-compatible object store (S3Proxy, filesystem backend) for the lake, fetched once with Maven."""


def _local(port: int, home: str | None) -> LocalS3:
    return LocalS3(home=default_home() if home is None else Path(home), port=port)


_port = click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="Port on 127.0.0.1.")
_home = click.option(
    "--home", default=None, help="Folder for jars, data and logs (default CALLSTREAM_S3_HOME or ./.s3proxy)."
)


@s3.command("start")
@_port
@_home
@click.option("--wait", default=60.0, show_default=True, help="Seconds to wait for the server to answer.")
def s3_start(port: int, home: str | None, wait: float) -> None:
    """Start the server (fetching it on first use) and print the variables that point the lake at it."""
    server = _local(port, home)
    try:
        server.start(wait=wait, say=lambda m: click.echo(m, err=True))
    except CallstreamError as exc:
        raise _fail(exc) from exc
    for k, v in server.env().items():
        click.echo(f"export {k}={v}")


@s3.command("stop")
@_port
@_home
def s3_stop(port: int, home: str | None) -> None:
    """Stop the server that `s3 start` started."""
    _local(port, home).stop(say=click.echo)


@s3.command("status")
@_port
@_home
def s3_status(port: int, home: str | None) -> None:
    """Say whether the server runs; exit status 1 when it does not answer."""
    server = _local(port, home)
    click.echo(server.status())
    sys.exit(0 if server.running() else 1)


# -- lake ---------------------------------------------------------------------------------------


@click.group()
def lake() -> None:
    """The Iceberg lake (CALLSTREAM_LAKE_WAREHOUSE + CALLSTREAM_LAKE_CATALOG): upkeep and status."""


def _catalog() -> LakeCatalog:
    from warehouse.lake.catalog import open_catalog
    from warehouse.lake.settings import LakeSettings

    try:
        return open_catalog(LakeSettings())
    except (CallstreamError, ValidationError) as exc:
        raise _fail(exc) from exc


@lake.command("maintain")
@click.option(
    "--retain",
    default=3600.0,
    show_default=True,
    help="Seconds a replaced snapshot stays readable (and unreferenced files stay).",
)
@click.option("--target-mb", default=32, show_default=True, help="Size of the files small files are compacted into.")
@click.option("--every", type=float, default=None, help="Run again every this many seconds, until stopped.")
def lake_maintain(retain: float, target_mb: int, every: float | None) -> None:
    """Compact small files, expire old snapshots and delete the files no snapshot needs.

    Safe while sinks write and readers read: a snapshot stays for --retain seconds after it was
    replaced, and the Kafka offsets of every partition are checkpointed before old snapshots go.
    """
    from warehouse.lake.maintain import maintain

    catalog = _catalog()
    while True:
        try:
            stats = maintain(catalog, retain_seconds=retain, target_bytes=target_mb * 1024 * 1024)
        except CallstreamError as exc:
            raise _fail(exc) from exc
        click.echo(f"lake maintain: {stats.summary()}")
        if every is None:
            return
        time.sleep(every)


@lake.command("status")
def lake_status() -> None:
    """Rows, files and snapshots of each table, and the Kafka offsets the lake holds."""
    from warehouse.lake import offsets
    from warehouse.lake.files import FileIndex
    from warehouse.lake.read import NAMES

    catalog = _catalog()
    tables = catalog.load_tables(NAMES)
    for name, t in tables.items():
        snap = t.current_snapshot()
        rows = snap.summary.get("total-records") if snap and snap.summary else 0
        click.echo(
            f"{name}: {rows or 0} rows, {len(FileIndex().live_files(t))} files, {len(t.metadata.snapshots)} snapshots"
        )
        for (topic, p), o in sorted(offsets.stored(t.metadata).items()):
            click.echo(f"  {topic}[{p}] next offset {o}")


# -- the sink -----------------------------------------------------------------------------------


def run_lake_sink_if_configured(until_caught_up: bool) -> bool:
    """Run the lake sink when the lake is configured (True), else leave `callstream sink` to DuckDB."""
    from warehouse.lake.settings import LakeSettings

    try:
        cfg = LakeSettings()
    except ValidationError as exc:
        raise _fail(exc) from exc
    if not cfg.enabled:
        return False
    from warehouse.lake.sink import run_lake_sink

    try:
        stats = run_lake_sink(cfg, until_caught_up=until_caught_up)
    except CallstreamError as exc:
        raise _fail(exc) from exc
    click.echo(f"sink: {stats.records} records, {stats.rows} rows, {stats.dead_letters} dead letters", err=True)
    return True


def register(main: click.Group) -> None:
    main.add_command(s3)
    main.add_command(lake)
