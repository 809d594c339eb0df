"""Writing a Parquet part sorted by its table's key, in bounded memory.

Sorted parts let a reader of one call read one row group of a file (its key range) instead of the
file. DuckDB's ORDER BY keeps about the whole payload in memory (a day of utterances takes a GB), so
parts are sorted here instead: a source of at most BUCKET_ROWS rows is sorted in one go (Arrow);
a larger one is spread by key range over at most MAX_BUCKETS temporary files (bounds taken from a
sample of its keys), which are then sorted one at a time and appended to the part in key order. Two
passes over the source, and memory for one bucket.
"""

from __future__ import annotations

import bisect
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warehouse.db import run, scalar

BUCKET_ROWS = 16_384
MAX_BUCKETS = 256
ROW_GROUP_ROWS = 16_384
_BATCH_ROWS = 8_192
_SAMPLES_PER_BUCKET = 64


def copy_parquet(con: duckdb.DuckDBPyConnection, query: str, dest: Path, compression: str) -> int:
    """Write the rows of `query` to `dest` as they come (streaming, in DuckDB's memory); return the
    rows written (0: no file)."""
    written = scalar(
        con,
        f"COPY ({query}) TO '{dest}' (FORMAT parquet, COMPRESSION {compression}, ROW_GROUP_SIZE {ROW_GROUP_ROWS})",
    )
    if not written:
        dest.unlink(missing_ok=True)
    return int(written or 0)


def write_sorted(
    con: duckdb.DuckDBPyConnection, query: str, order: tuple[str, ...], dest: Path, compression: str, scratch: Path
) -> int:
    """Write the rows of `query` to the Parquet file `dest`, sorted by `order` (its first column is
    the key that buckets split on); return the rows written (0: no file). `scratch` holds the buckets."""
    total = int(scalar(con, f"SELECT count(*) FROM ({query})") or 0)
    if not total:
        return 0
    by = [(c, "ascending") for c in order]
    compression = "none" if compression == "uncompressed" else compression
    buckets = min(MAX_BUCKETS, math.ceil(total / BUCKET_ROWS))
    if buckets == 1:
        table = con.sql(query).to_arrow_table()
        pq.write_table(table.sort_by(by), dest, row_group_size=ROW_GROUP_ROWS, compression=compression)
        return int(table.num_rows)
    bounds = _bounds(con, query, order[0], buckets)
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        files, schema = _spread(con.sql(query).to_arrow_reader(_BATCH_ROWS), order[0], bounds, work)
        with pq.ParquetWriter(dest, schema, compression=compression) as out:
            for f in files:
                out.write_table(pq.read_table(f).sort_by(by), row_group_size=ROW_GROUP_ROWS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return total


def _bounds(con: duckdb.DuckDBPyConnection, query: str, key: str, buckets: int) -> list[Any]:
    """The first key of every bucket but the first, from a sample of the source's keys."""
    rows = run(con, f"SELECT {key} FROM ({query}) USING SAMPLE {buckets * _SAMPLES_PER_BUCKET} ROWS")
    sample = sorted(k for (k,) in rows if k is not None)
    return sorted({sample[i * len(sample) // buckets] for i in range(1, buckets)})


def _spread(reader: pa.RecordBatchReader, key: str, bounds: list[Any], work: Path) -> tuple[list[Path], pa.Schema]:
    """Each row into the file of its key range; the files in key order, and the rows' schema."""
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for batch in reader:
            where = pa.array([bisect.bisect_right(bounds, k) for k in batch.column(key).to_pylist()], pa.int32())
            for b in pc.unique(where).to_pylist():
                if b not in writers:
                    writers[b] = pq.ParquetWriter(work / f"{b:05d}.parquet", batch.schema)
                writers[b].write_batch(pc.filter(batch, pc.equal(where, b)))
    finally:
        for w in writers.values():
            w.close()
    return [work / f"{b:05d}.parquet" for b in sorted(writers)], reader.schema
