"""`lake maintain` on PostgreSQL + S3Proxy while a writer commits and a reader reads: small files are
compacted, old snapshots expired and unreferenced files deleted; no read fails or sees a wrong row,
and the offsets a sink resumes from are unchanged."""

from __future__ import annotations

import threading
import time

import orjson

from callstream.fakecalls import CallFactory, Fleet
from tests.support.lake import stored_offsets
from warehouse.lake.files import FileIndex
from warehouse.lake.maintain import maintain
from warehouse.lake.read import connect
from warehouse.lake.writer import FamilyRows, LakeWriter
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CALL_FAMILY

TOPIC = "m.call_analyzed"


class _Calls:
    def __init__(self) -> None:
        self.factory = CallFactory(Fleet(seed=61, agents=2), seed=61, turns=(2, 4))
        self.next_offset = 0

    def batch(self, n: int, partition: int = 0) -> FamilyRows:
        b = FamilyBatch(CALL_FAMILY)
        for _ in range(n):
            body = self.factory.events("completed")[-1].payload
            b.add(orjson.dumps(body), Source(partition, self.next_offset, 1_790_000_000_000, 1))
            self.next_offset += 1
        return FamilyRows(CALL_FAMILY, b.tables(), {(TOPIC, partition): self.next_offset})


def _live_files(catalog, name: str) -> int:
    return len(FileIndex().live_files(catalog.load_tables([name])[name]))


def test_maintain_compacts_and_expires_while_a_writer_writes_and_a_reader_reads(shared_lake, lake_catalog):
    catalog = lake_catalog(shared_lake)
    calls = _Calls()
    writer = LakeWriter(catalog)
    for _ in range(20):
        writer.commit([calls.batch(10)])
    assert _live_files(catalog, "calls") == 20
    failures: list[str] = []
    reads = 0
    stop = threading.Event()

    def read() -> None:
        nonlocal reads
        lake = connect(catalog=catalog)
        try:
            while not stop.is_set():
                lake.refresh()
                n, distinct, utterances = lake.sql(
                    "SELECT count(*), count(DISTINCT call_id), sum(utterance_count) FROM calls"
                ).fetchall()[0]
                stored = lake.sql("SELECT count(*) FROM call_utterances").fetchall()[0][0]
                if n != distinct or n % 10 or utterances != stored:
                    failures.append(
                        f"read {reads}: {n} calls, {distinct} distinct, {utterances} vs {stored} utterances"
                    )
                reads += 1
        except BaseException as exc:
            failures.append(f"read {reads} failed: {exc!r}")
        finally:
            lake.close()

    def write() -> None:
        for _ in range(10):
            writer.commit([calls.batch(10)])

    reader = threading.Thread(target=read)
    reader.start()
    more = threading.Thread(target=write)
    more.start()
    first = maintain(catalog, retain_seconds=3.0)
    more.join()
    time.sleep(3.5)
    second = maintain(catalog, retain_seconds=3.0)
    stop.set()
    reader.join()

    assert not failures, failures
    assert reads >= 3
    assert first.compacted_files >= 20 and first.written_files >= 1, first
    assert second.expired_snapshots > 0 and second.deleted_files > 0, second
    assert second.tables["calls"]["files"] <= 2, second.tables
    lake = connect(catalog=catalog)
    assert lake.sql("SELECT count(*), count(DISTINCT call_id) FROM calls").fetchall() == [(300, 300)]
    lake.close()
    # Old snapshots are gone, yet a restarted sink still finds where each partition ends.
    assert stored_offsets(catalog) == {(TOPIC, 0): 300}
    assert len(catalog.load_tables(["calls"])["calls"].metadata.snapshots) < 10
