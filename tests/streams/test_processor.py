"""The processor without Kafka: dedupe, reordering, late analysis, transfers, and crash recovery."""

from __future__ import annotations

import random
from typing import Any

import pytest

from callstream.fakecalls import CallFactory, Event, Fleet
from streams.alertrules import load_config
from streams.errors import StateUnreadable
from streams.metrics import ALL, exact_quantile, merge, summarize
from streams.processor import Alert, DictStore, EventMessage, Processor

T0 = 1_790_000_040_000  # a whole minute


def as_in(ev: Event, ts: int, partition: int = 0) -> EventMessage:
    return EventMessage(partition, ev.event, ev.key.encode(), ev.body(), ts)


@pytest.fixture
def factory() -> CallFactory:
    return CallFactory(Fleet(seed=5, agents=2), seed=5, turns=(4, 6))


def totals(proc: Processor, scope: str = ALL) -> dict[str, Any]:
    return summarize(merge(proc.book(p).totals[scope] for p in proc.books if scope in proc.book(p).totals))


def test_duplicates_and_repeated_transcripts_count_once(factory: CallFactory) -> None:
    evs = factory.events("completed", now_ms=T0)
    proc = Processor(DictStore(), load_config())
    proc.process([as_in(e, T0) for e in evs])
    once = totals(proc)
    # The sender retries everything, twice, in a later batch: nothing changes.
    proc.process([as_in(e, T0 + 5) for e in evs + evs])
    assert totals(proc) == once
    assert once["calls"] == 1 and once["calls_started"] == 1 and once["calls_analyzed"] == 1
    assert once["events"]["transcript_updated"] == sum(e.event == "transcript_updated" for e in evs)
    assert once["active_calls"] == 0 and once["connected"] == 1


def test_failed_dial_has_no_call_started_and_raises_once(factory: CallFactory) -> None:
    evs = factory.events("failed_dial", now_ms=T0)
    assert "call_started" not in {e.event for e in evs}
    got: list[Alert] = []
    proc = Processor(DictStore(), load_config(), got.append)
    proc.process([as_in(e, T0) for e in evs + evs])
    t = totals(proc)
    assert (t["calls"], t["calls_started"], t["not_connected"], t["connected"], t["failed"]) == (1, 0, 1, 0, 1)
    assert t["failure_rate"] == 1.0
    assert [a.rule for a in got] == ["failed_dial"]  # call_analyzed's call_successful=false is not "unsuccessful"
    assert t["duration_p50_ms"] is None  # a call that never connected has no duration


def test_late_and_reordered_analysis(factory: CallFactory) -> None:
    evs = factory.events("completed", now_ms=T0)
    ended = next(e for e in evs if e.event == "call_ended")
    analyzed = next(e for e in evs if e.event == "call_analyzed")
    started = next(e for e in evs if e.event == "call_started")
    proc = Processor(DictStore(), load_config())
    # call_analyzed arrives first, then call_started, and call_ended two minutes later.
    proc.process([as_in(analyzed, T0), as_in(started, T0 + 1)])
    mid = totals(proc)
    assert mid["calls_finished"] == 1 and mid["active_calls"] == 0 and mid["calls_ended"] == 0
    proc.process([as_in(ended, T0 + 120_000)])
    t = totals(proc)
    assert t["calls_ended"] == 1 and t["calls_finished"] == 1 and t["active_calls"] == 0
    assert sum(t["disconnection_reasons"].values()) == 1  # the outcome counted once
    dur = ended.payload["call"]["duration_ms"]
    assert t["duration_p50_ms"] == pytest.approx(dur, rel=0.02)


def test_active_calls_while_in_progress(factory: CallFactory) -> None:
    evs = factory.events("completed", now_ms=T0)
    proc = Processor(DictStore(), load_config())
    proc.process([as_in(evs[0], T0)])
    assert totals(proc)["active_calls"] == 1
    proc.process([as_in(e, T0) for e in evs[1:]])
    assert totals(proc)["active_calls"] == 0


def test_transfer_cancelled_and_bridged(factory: CallFactory) -> None:
    bridged = factory.events("transfer_bridged", now_ms=T0)
    cancelled = factory.events("transfer_cancelled", now_ms=T0)
    got: list[Alert] = []
    proc = Processor(DictStore(), load_config(), got.append)
    proc.process([as_in(e, T0) for e in bridged + cancelled + cancelled])
    t = totals(proc)
    assert (t["transfers_started"], t["transfers_bridged"], t["transfers_cancelled"]) == (2, 1, 1)
    cid = cancelled[0].key
    assert sorted(a.id for a in got) == sorted(
        [f"transfer_cancelled:{cid}", f"unsuccessful:{cid}", f"negative_sentiment:{cid}"]
    )


def test_windows_are_per_minute_and_per_agent(factory: CallFactory) -> None:
    a = factory.events("completed", now_ms=T0)
    b = factory.events("completed", now_ms=T0)
    proc = Processor(DictStore(), load_config())
    proc.process([as_in(e, T0 + 1000) for e in a] + [as_in(e, T0 + 61_000) for e in b])
    book = proc.book(0)
    assert sorted(book.windows) == [T0, T0 + 60_000]
    assert all(w[ALL].counts["calls"] == 1 for w in book.windows.values())


def _scenario(factory: CallFactory, calls: int) -> tuple[list[EventMessage], set[str]]:
    rng = random.Random(11)
    msgs: list[EventMessage] = []
    ids = set()
    for i in range(calls):
        evs = factory.events(now_ms=T0)
        ids.add(evs[0].key)
        p = hash(evs[0].key) % 3
        for e in evs:
            msgs.append(EventMessage(p, e.event, e.key.encode(), e.body(), T0 + i * 250))
            if rng.random() < 0.2:
                msgs.append(EventMessage(p, e.event, e.key.encode(), e.body(), T0 + i * 250))
    return msgs, ids


def _replay(changelog: list[tuple[int, bytes, bytes | None]]) -> DictStore:
    store = DictStore()
    for _, k, v in changelog:
        if v is None:
            store.data.pop(k, None)
        else:
            store.data[k] = v
    return store


@pytest.mark.parametrize("seed", range(8))
def test_crash_at_any_point_recovers_without_double_counting(factory: CallFactory, seed: int) -> None:
    """Cut the changelog anywhere (a SIGKILL loses a tail), recover, reprocess the uncommitted
    batches: the totals equal a run without the crash."""
    msgs, ids = _scenario(factory, 60)
    batches = [msgs[i : i + 37] for i in range(0, len(msgs), 37)]
    rules = load_config()
    clean = Processor(DictStore(), rules)
    for b in batches:
        clean.process(b)
    want = {p: totals_of(clean, p) for p in range(3)}

    rng = random.Random(seed)
    first = Processor(DictStore(), rules)
    done = rng.randrange(1, len(batches))
    for b in batches[:done]:
        first.process(b)
    log = first.store.changelog  # type: ignore[attr-defined]
    cut = rng.randrange(len(log) // 2, len(log) + 1)
    # Offsets were committed at most for batches whose writes were all flushed before the cut.
    committed, n = 0, 0
    for i in range(done):
        probe = Processor(DictStore(), rules)
        for bb in batches[: i + 1]:
            probe.process(bb)
        if len(probe.store.changelog) <= cut:  # type: ignore[attr-defined]
            committed, n = i + 1, len(probe.store.changelog)  # type: ignore[attr-defined]
    assert n <= cut
    store = _replay(log[:cut])
    second = Processor(store, rules)
    for b in batches[committed:]:
        second.process(b)
    got = {p: totals_of(second, p) for p in range(3)}
    assert got == want
    assert sum(g["calls"] + g["chats"] for g in got.values()) == len(ids)


def totals_of(proc: Processor, p: int) -> dict[str, Any]:
    book = proc.book(p)
    t = book.totals.get(ALL)
    out = summarize(t) if t else {}
    out["chats"] = t.counts.get("chats", 0) if t else 0
    out["windows"] = {w: summarize(v[ALL]) for w, v in sorted(book.windows.items())}
    return out


def test_histogram_quantiles_are_within_two_percent() -> None:
    from streams.metrics import Agg, Effects

    rng = random.Random(3)
    xs = [rng.uniform(500, 600_000) for _ in range(1000)]
    agg = Agg()
    Effects(durations=xs).apply_to(agg)
    s = summarize(agg)
    assert s["duration_p50_ms"] == pytest.approx(exact_quantile(xs, 0.5), rel=0.02)
    assert s["duration_p95_ms"] == pytest.approx(exact_quantile(xs, 0.95), rel=0.02)


def test_recovery_of_a_state_it_cannot_read_raises_at_once() -> None:
    store = DictStore()
    store.data[b"p:1"] = b"\xc1 not msgpack"
    proc = Processor(store, load_config())
    proc.recover([0])  # a partition without a state is fine
    with pytest.raises(StateUnreadable, match="partition 1 of the state table"):
        proc.recover([0, 1])
