"""Parts sorted by key in bounded memory: one bucket, or many spread by key range and appended in order."""

from __future__ import annotations

import itertools
from pathlib import Path

import duckdb
import pytest

from warehouse import sorted_parts
from warehouse.sorted_parts import write_sorted

SOURCE = """
    SELECT 'call_' || md5((i % 300)::VARCHAR) AS call_id, (i // 300)::INTEGER AS turn,
           repeat('x', (i % 7)::INTEGER) AS content, NULL::VARCHAR AS detail
    FROM range(2400) t(i)
"""


@pytest.mark.parametrize("bucket_rows", [100_000, 97], ids=["one bucket", "many buckets"])
def test_a_part_is_written_sorted_by_key_with_every_row_once(tmp_path: Path, monkeypatch, bucket_rows: int):
    monkeypatch.setattr(sorted_parts, "BUCKET_ROWS", bucket_rows)
    monkeypatch.setattr(sorted_parts, "ROW_GROUP_ROWS", 256)
    con = duckdb.connect()
    dest = tmp_path / "part.parquet"
    assert write_sorted(con, SOURCE, ("call_id", "turn"), dest, "zstd", tmp_path / "scratch") == 2400
    rows = con.execute(f"SELECT * FROM read_parquet('{dest}')").fetchall()
    assert rows == sorted(con.execute(SOURCE).fetchall())  # sorted, nothing lost or doubled
    # Row groups hold key ranges that do not overlap: a lookup of one call reads one or two of them.
    stats = con.execute(
        f"SELECT stats_min_value, stats_max_value FROM parquet_metadata('{dest}') WHERE path_in_schema = 'call_id' "
        "ORDER BY row_group_id"
    ).fetchall()
    assert len(stats) > 1 and all(a[1] <= b[0] for a, b in itertools.pairwise(stats))
    assert not any((tmp_path / "scratch").glob("*/*"))  # the buckets are gone


def test_an_empty_source_writes_no_file(tmp_path: Path):
    dest = tmp_path / "part.parquet"
    assert write_sorted(duckdb.connect(), f"{SOURCE} WHERE false", ("call_id",), dest, "zstd", tmp_path) == 0
    assert not dest.exists()
