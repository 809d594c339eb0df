"""A warehouse built in-process with the sink's own parts (row builder, load transaction, Parquet
publisher), batch after batch, each published as its own snapshot: for tests that need one without Kafka."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb
import orjson

from warehouse import ledger
from warehouse.load import Batch, write_batch
from warehouse.migrations import migrate
from warehouse.parquet import ParquetPublisher
from warehouse.personal_data import KEEP_ALL, PersonalData
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CALL_FAMILY, CHAT_FAMILY, TABLES, last_load_seq

TOPICS = {"t.call_analyzed": CALL_FAMILY, "t.chat_analyzed": CHAT_FAMILY}


def build(db: Path, parquet: Path, batches: Iterable[list[dict[str, Any]]], personal: PersonalData = KEEP_ALL) -> None:
    """Load each batch of webhook bodies (calls and chats) as one load, publishing after each."""
    db.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db))
    migrate(con)
    publisher = ParquetPublisher(con, parquet, min_interval=0, compression="uncompressed")
    offset = 0
    seq = max(ledger.last_seq(con), last_load_seq(con, TABLES))
    for bodies in batches:
        seq += 1
        families = {t: FamilyBatch(f, personal) for t, f in TOPICS.items()}
        first, nxt = {}, {}
        for body in bodies:
            t = "t.call_analyzed" if "call" in body else "t.chat_analyzed"
            families[t].add(orjson.dumps(body), Source(0, offset, 1_790_000_000_000, 1_790_000_000_000))
            first.setdefault((t, 0), offset)
            nxt[(t, 0)] = offset + 1
            offset += 1
        tables = {t: b.tables() for t, b in families.items() if len(b)}
        write_batch(con, TOPICS, Batch(tables, first, nxt, len(bodies)), seq)
        publisher.publish()
    publisher.stop(final=True)
    con.close()
