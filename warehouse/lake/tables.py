"""The Iceberg tables of the lake: the columns of `warehouse.schema`, partitioned by `day`.

Types map one to one (JSON columns are strings, as Trino and Spark read them); `NOT NULL` columns are
required fields. Timestamps are Iceberg's microsecond timestamps without zone: the warehouse's
millisecond Arrow columns are cast on write.
"""

from __future__ import annotations

import pyarrow as pa
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import (
    BooleanType,
    DateType,
    DoubleType,
    IcebergType,
    IntegerType,
    LongType,
    NestedField,
    StringType,
    TimestampType,
)

from warehouse.schema import Table

PARTITION_COLUMN = "day"

_TYPES: dict[str, IcebergType] = {
    "VARCHAR": StringType(),
    "JSON": StringType(),
    "BIGINT": LongType(),
    "INTEGER": IntegerType(),
    "DOUBLE": DoubleType(),
    "BOOLEAN": BooleanType(),
    "TIMESTAMP": TimestampType(),
    "DATE": DateType(),
}

# Every table of the lake: small files get compacted, old metadata files go after each commit.
TABLE_PROPERTIES = {
    "format-version": "2",
    "write.parquet.compression-codec": "zstd",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "100",
}


def iceberg_schema(table: Table) -> Schema:
    """The Iceberg schema of a warehouse table; field ids follow the column order."""
    fields = [
        NestedField(
            field_id=i,
            name=c.name,
            field_type=_TYPES[c.sql.split()[0]],
            required="NOT NULL" in c.sql,
        )
        for i, c in enumerate(table.columns, start=1)
    ]
    return Schema(*fields)


def partition_spec(schema: Schema) -> PartitionSpec:
    day = schema.find_field(PARTITION_COLUMN)
    return PartitionSpec(
        PartitionField(source_id=day.field_id, field_id=1000, transform=IdentityTransform(), name=PARTITION_COLUMN)
    )


def write_schema(table: Table) -> pa.Schema:
    """The Arrow schema rows are written with: the warehouse's, timestamps in microseconds."""
    fields = []
    for f in table.arrow_schema:
        t = pa.timestamp("us") if pa.types.is_timestamp(f.type) else f.type
        fields.append(pa.field(f.name, t, nullable="NOT NULL" not in _sql(table, f.name)))
    return pa.schema(fields)


def _sql(table: Table, name: str) -> str:
    return next(c.sql for c in table.columns if c.name == name)


def for_write(table: Table, rows: pa.Table) -> pa.Table:
    """Rows of `table` as built by `warehouse.records`, cast to what the Iceberg table stores."""
    return rows.select(table.column_names).cast(write_schema(table))
