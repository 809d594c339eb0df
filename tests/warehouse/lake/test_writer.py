"""The lake writer on a real SQLite catalog and folder: concurrent commits, the later-delivery rule,
and atomic commits across a family's tables."""

from __future__ import annotations

import orjson
import pytest
from pyiceberg.exceptions import CommitFailedException

from callstream.fakecalls import CallFactory, Fleet
from tests.support.lake import stored_offsets
from warehouse.lake import offsets
from warehouse.lake.catalog import LakeCatalog, TableChange
from warehouse.lake.read import arrow
from warehouse.lake.settings import LakeSettings
from warehouse.lake.writer import FamilyRows, LakeWriter
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CALL_FAMILY

TOPIC = "w.call_analyzed"


@pytest.fixture
def bodies() -> list[bytes]:
    factory = CallFactory(Fleet(seed=71, agents=2), seed=71, turns=(2, 4))
    return [orjson.dumps(factory.events("completed")[-1].payload) for _ in range(60)]


def _rows(bodies: list[bytes], partition: int, first_offset: int) -> FamilyRows:
    b = FamilyBatch(CALL_FAMILY)
    for i, body in enumerate(bodies):
        b.add(body, Source(partition, first_offset + i, 1_790_000_000_000, 1))
    return FamilyRows(CALL_FAMILY, b.tables(), {(TOPIC, partition): first_offset + len(bodies)})


class _Interleaved(LakeCatalog):
    """A catalog whose next commit first lets another writer commit: the race, made certain."""

    before_next_commit = None

    def commit_tables(self, changes: list[TableChange]):  # type: ignore[no-untyped-def]
        run, self.before_next_commit = self.before_next_commit, None
        if run is not None:
            run()
        return super().commit_tables(changes)


def _open(tmp_path, cls=LakeCatalog) -> LakeCatalog:
    from warehouse.lake.catalog import ensure_tables

    settings = LakeSettings(lake_warehouse=str(tmp_path / "lake"), lake_catalog=f"sqlite:///{tmp_path / 'c.db'}")
    cat = cls("callstream", uri=settings.catalog_url(), warehouse=settings.warehouse_uri())
    ensure_tables(cat)
    return cat


def test_a_commit_that_loses_the_race_is_retried_and_never_moves_the_other_writers_offsets(tmp_path, bodies):
    a_cat = _open(tmp_path, _Interleaved)
    b = LakeWriter(_open(tmp_path))
    a = LakeWriter(a_cat)
    a_cat.before_next_commit = lambda: b.commit([_rows(bodies[30:], partition=1, first_offset=0)])
    stats = a.commit([_rows(bodies[:30], partition=0, first_offset=0)])
    assert stats.attempts == 2
    assert stored_offsets(a_cat) == {(TOPIC, 0): 30, (TOPIC, 1): 30}
    calls = a_cat.load_tables(["calls"])["calls"]
    carried = [offsets.from_summary(s.summary.additional_properties) for s in calls.metadata.snapshots if s.summary]
    assert carried == [{(TOPIC, 1): 30}, {(TOPIC, 0): 30}]  # each commit carries its own partition only
    got = arrow(a_cat)
    assert got["calls"].num_rows == 60
    assert sum(got["calls"]["utterance_count"].to_pylist()) == got["call_utterances"].num_rows


def test_a_replayed_older_delivery_never_replaces_a_later_one(tmp_path, bodies):
    cat = _open(tmp_path)
    w = LakeWriter(cat)
    w.commit([_rows(bodies[:10], partition=0, first_offset=100)])
    before = arrow(cat)
    stats = w.commit([_rows(bodies[:10], partition=0, first_offset=0)])  # the same calls, from earlier offsets
    assert (stats.kept, stats.replaced, stats.rows["calls"]) == (10, 0, 0)
    after = arrow(cat)
    for name in ("calls", "call_utterances", "call_tool_calls"):
        assert (
            after[name].sort_by(after[name].column_names[0]).equals(before[name].sort_by(before[name].column_names[0]))
        )
    assert stored_offsets(cat) == {(TOPIC, 0): 110}  # offsets only grow

    stats = w.commit([_rows(bodies[:4], partition=0, first_offset=200)])  # later deliveries replace
    assert (stats.kept, stats.replaced) == (0, 4)
    calls = arrow(cat)["calls"]
    assert calls.num_rows == 10
    assert sorted(calls["kafka_offset"].to_pylist()) == [*range(104, 110), *range(200, 204)]


def test_a_family_commits_all_of_its_tables_or_none(tmp_path, bodies):
    from warehouse.lake.writer import _snapshot

    cat = _open(tmp_path)
    w = LakeWriter(cat)
    w.commit([_rows(bodies[:5], partition=0, first_offset=0)])
    names = ["calls", "call_utterances", "call_tool_calls"]
    stale = cat.load_tables(["calls"])["calls"]  # the last of the three in commit order
    w.commit([_rows(bodies[5:10], partition=0, first_offset=5)])
    current = cat.load_tables(names)
    before = cat.locations(names)
    # New snapshots for two tables built on their current state, one on a state that is gone.
    bases = [current["call_tool_calls"], current["call_utterances"], stale]
    changes = []
    for t in bases:
        txn = _snapshot(t, [], [], {"test": "1"})
        changes.append(TableChange(t, txn._requirements, txn._updates))
    with pytest.raises(CommitFailedException):
        cat.commit_tables(changes)
    assert cat.locations(names) == before  # not one of them moved
