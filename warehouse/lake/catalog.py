"""The lake's SQL catalog (SQLite or PostgreSQL, as pyiceberg's SqlCatalog keeps it), with atomic
commits across tables.

pyiceberg commits one table at a time: a batch of calls would show up in `calls` before its
utterances reach `call_utterances`. `commit_tables` writes each table's new metadata file, then moves
every table's pointer in one SQL transaction, each only if it still points where the change was
built from (optimistic concurrency: a concurrent commit makes the whole change fail with
CommitFailedException, and the writer builds it again on the new state). `load_tables` reads the
pointers of several tables in one query, so a reader always sees whole commits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from pyiceberg.catalog.sql import IcebergTables, SqlCatalog
from pyiceberg.exceptions import CommitFailedException, NamespaceAlreadyExistsError, TableAlreadyExistsError
from pyiceberg.io import load_file_io
from pyiceberg.serializers import FromInputFile
from pyiceberg.table import Table
from pyiceberg.table.update import TableRequirement, TableUpdate
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from warehouse.lake.errors import LakeError
from warehouse.lake.settings import LakeSettings, S3Settings, storage_properties
from warehouse.lake.tables import TABLE_PROPERTIES, iceberg_schema, partition_spec
from warehouse.schema import TABLES

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TableChange:
    """Updates to one table, built on `base` (the state the catalog must still point at)."""

    base: Table
    requirements: tuple[TableRequirement, ...]
    updates: tuple[TableUpdate, ...]


class LakeCatalog(SqlCatalog):
    namespace: str = "callstream"

    def locations(self, names: list[str]) -> dict[str, str]:
        """Where each table's current metadata is, read in one query (one consistent state)."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(IcebergTables.table_name, IcebergTables.metadata_location).where(
                    IcebergTables.catalog_name == self.name,
                    IcebergTables.table_namespace == self.namespace,
                    IcebergTables.table_name.in_(names),
                )
            ).all()
        found = {name: loc for name, loc in rows if loc}
        missing = sorted(set(names) - set(found))
        if missing:
            raise LakeError(f"the lake has no table {', '.join(missing)} in namespace {self.namespace}")
        return found

    def load_tables(self, names: list[str], known: dict[str, Table] | None = None) -> dict[str, Table]:
        """The tables as of one moment; a table in `known` already at that state is not read again."""
        out: dict[str, Table] = {}
        for name, location in self.locations(names).items():
            have = (known or {}).get(name)
            out[name] = have if have is not None and have.metadata_location == location else self._open(name, location)
        return out

    def _open(self, name: str, location: str) -> Table:
        metadata = FromInputFile.table_metadata(load_file_io(self.properties, location).new_input(location))
        return Table(
            identifier=(self.namespace, name),
            metadata=metadata,
            metadata_location=location,
            io=self._load_file_io(metadata.properties, location),
            catalog=self,
        )

    def commit_tables(self, changes: list[TableChange]) -> dict[str, Table]:
        """Apply every change or none (CommitFailedException when a table moved meanwhile)."""
        staged = []
        for ch in sorted(changes, key=lambda c: c.base.name()[-1]):  # one order: no deadlock between writers
            st = self._update_and_stage_table(ch.base, ch.base.name(), ch.requirements, ch.updates)
            self._write_metadata(metadata=st.metadata, io=st.io, metadata_path=st.metadata_location)
            staged.append((ch.base, st))
        try:
            self._swap_pointers(
                [(base.name()[-1], base.metadata_location, st.metadata_location) for base, st in staged]
            )
        except CommitFailedException:
            for _, st in staged:
                with contextlib.suppress(OSError):
                    st.io.delete(st.metadata_location)
            raise
        out = {}
        for base, st in staged:
            with contextlib.suppress(Exception):  # old metadata files are only tidied up
                self._delete_old_metadata(st.io, base.metadata, st.metadata)
            out[base.name()[-1]] = Table(
                identifier=base.name(),
                metadata=st.metadata,
                metadata_location=st.metadata_location,
                io=st.io,
                catalog=self,
            )
        return out

    def _swap_pointers(self, swaps: list[tuple[str, str, str]]) -> None:
        try:
            with Session(self.engine) as session:
                for name, old, new in swaps:
                    result = session.execute(
                        update(IcebergTables)
                        .where(
                            IcebergTables.catalog_name == self.name,
                            IcebergTables.table_namespace == self.namespace,
                            IcebergTables.table_name == name,
                            IcebergTables.metadata_location == old,
                        )
                        .values(metadata_location=new, previous_metadata_location=old)
                    )
                    if result.rowcount < 1:  # type: ignore[attr-defined]
                        session.rollback()
                        raise CommitFailedException(f"{self.namespace}.{name} was changed by a concurrent commit")
                session.commit()
        except OperationalError as exc:  # SQLite: another writer held the database lock too long
            raise CommitFailedException(f"the catalog was busy: {exc}") from exc


def open_catalog(settings: LakeSettings, s3: S3Settings | None = None) -> LakeCatalog:
    """The configured catalog, with the namespace and the five tables created when missing."""
    if not settings.enabled:
        raise LakeError("the lake is off: set CALLSTREAM_LAKE_WAREHOUSE and CALLSTREAM_LAKE_CATALOG")
    warehouse = settings.warehouse_uri()
    props = {"uri": settings.catalog_url(), "warehouse": warehouse, **storage_properties(warehouse, s3)}
    try:
        _ensure_bucket(warehouse, props)
        catalog = LakeCatalog(settings.lake_catalog_name, **props)
        catalog.namespace = settings.lake_namespace
        ensure_tables(catalog)
    except (SQLAlchemyError, OSError) as exc:
        raise LakeError(f"cannot open the lake ({settings.describe()}): {exc}") from exc
    return catalog


def open_catalog_from(env: Mapping[str, str]) -> LakeCatalog:
    """The catalog of a lake given by its variables (as a tool sets them for the sinks it starts)."""
    settings = LakeSettings.model_validate(
        {
            "lake_warehouse": env["CALLSTREAM_LAKE_WAREHOUSE"],
            "lake_catalog": env["CALLSTREAM_LAKE_CATALOG"],
            "lake_namespace": env.get("CALLSTREAM_LAKE_NAMESPACE", "callstream"),
        }
    )
    s3 = None
    if "AWS_ENDPOINT_URL" in env:
        s3 = S3Settings.model_validate({k: v for k, v in env.items() if k.startswith("AWS_")})
    return open_catalog(settings, s3)


def ensure_tables(catalog: LakeCatalog) -> None:
    """Create the namespace and the tables that are missing (concurrent sinks may race: both fine)."""
    with contextlib.suppress(NamespaceAlreadyExistsError):
        catalog.create_namespace(catalog.namespace)
    existing = {ident[-1] for ident in catalog.list_tables(catalog.namespace)}
    for t in TABLES:
        if t.name in existing:
            continue
        schema = iceberg_schema(t)
        with contextlib.suppress(TableAlreadyExistsError):
            catalog.create_table(
                (catalog.namespace, t.name), schema, partition_spec=partition_spec(schema), properties=TABLE_PROPERTIES
            )
            log.info("lake: created table %s.%s", catalog.namespace, t.name)


def _ensure_bucket(warehouse: str, props: dict[str, str]) -> None:
    """An S3 warehouse's bucket is created on first use (a local folder is created by the settings)."""
    url = urlparse(warehouse)
    if url.scheme not in ("s3", "s3a"):
        return
    from pyarrow import fs

    s3 = fs.S3FileSystem(
        access_key=props.get("s3.access-key-id"),
        secret_key=props.get("s3.secret-access-key"),
        endpoint_override=props.get("s3.endpoint"),
        region=props.get("s3.region"),
        allow_bucket_creation=True,
    )
    if s3.get_file_info(url.netloc).type == fs.FileType.NotFound:
        s3.create_dir(url.netloc)
