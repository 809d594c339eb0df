"""Running statements on a DuckDB connection.

DuckDB 2 refuses new work on a connection whose last result was not read to the end, and INSERT,
DELETE and COPY return a row count, so every statement here is read to completion.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from warehouse.errors import WarehouseError


def run(con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Execute one statement and return all its rows."""
    return con.execute(query, params).fetchall() if params is not None else con.execute(query).fetchall()


def scalar(con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None = None) -> Any:
    """The first column of the first row of one statement (None if it returns no row)."""
    rows = run(con, query, params)
    return rows[0][0] if rows else None


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN; COMMIT when the block ends, ROLLBACK (and re-raise) when it raises."""
    run(con, "BEGIN TRANSACTION")
    try:
        yield
        run(con, "COMMIT")
    except BaseException:
        run(con, "ROLLBACK")
        raise


def insert_rows(con: duckdb.DuckDBPyConnection, insert: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """`insert` ("INSERT INTO t VALUES") with all `rows` in one statement: executemany costs a round
    trip (and the GIL) per row."""
    if rows:
        row = "(" + ", ".join("?" * len(rows[0])) + ")"
        run(con, f"{insert} " + ", ".join([row] * len(rows)), [v for r in rows for v in r])


def open_for_writing(path: str, memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
    """The warehouse file opened by its one writer; a lock held by another process is a clear error."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        # DuckDB checkpoints by itself whenever its WAL passes checkpoint_threshold (16 MB by default:
        # every batch or two), and each checkpoint costs more as the tables grow; the sink also
        # checkpoints every `checkpoint_seconds`, so a larger threshold only bounds the WAL a restart replays.
        return duckdb.connect(
            path,
            config={
                "memory_limit": memory_limit,
                "threads": threads,
                "preserve_insertion_order": False,
                "checkpoint_threshold": "256MB",
            },
        )
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise WarehouseError(f"cannot open the warehouse {path}: {exc}") from exc
        raise WarehouseError(
            f"the warehouse {path} is open for writing in another process (DuckDB allows one writer): stop that "
            "process (another sink, or a notebook that opened the file) or set CALLSTREAM_WAREHOUSE to another file"
        ) from exc
