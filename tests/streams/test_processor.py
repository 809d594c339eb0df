"""The processor without Kafka: dedupe, reordering, late analysis, transfers, and crash recovery."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from callstream.fakecalls import CallFactory, Event, Fleet
from streams.alertrules import load_config
from streams.errors import StateUnreadable
from streams.lifetime import Lifetime
from streams.metrics import ALL, Agg, exact_quantile, merge, summarize
from streams.processor import Alert, DictStore, EventMessage, Processor, decode_pending

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


def _scenario(factory: CallFactory, calls: int, step_ms: int = 250) -> tuple[list[EventMessage], set[str]]:
    """`calls` calls, one every `step_ms` of event time (bodies and `received_at` alike), 20 % of
    their deliveries repeated."""
    rng = random.Random(11)
    msgs: list[EventMessage] = []
    ids = set()
    offsets: dict[tuple[int, str], int] = {}

    def message(p: int, e: Event, at: int) -> EventMessage:
        offset = offsets[(p, e.event)] = offsets.get((p, e.event), -1) + 1
        return EventMessage(p, e.event, e.key.encode(), e.body(), at, f"t.{e.event}", offset)

    for i in range(calls):
        at = T0 + i * step_ms
        evs = factory.events(now_ms=at)
        ids.add(evs[0].key)
        p = hash(evs[0].key) % 3
        for e in evs:
            msgs.append(message(p, e, at))
            if rng.random() < 0.2:
                msgs.append(message(p, e, at))
    return msgs, ids


def _outbox_ids(store: DictStore) -> list[str]:
    return [decode_pending(store.data[k]).alert.id for k in store.keys_with_prefix(b"a:")]


# Lifetimes far beyond the scenario (nothing expires), and short ones (calls expire during it).
LIFETIMES = {"kept": Lifetime(), "expiring": Lifetime(analyzed_ms=2_000, idle_ms=5_000)}


@pytest.mark.parametrize("lifetime", sorted(LIFETIMES))
@pytest.mark.parametrize("seed", range(8))
def test_crash_at_any_point_recovers_without_double_counting(factory: CallFactory, seed: int, lifetime: str) -> None:
    """Cut the changelog anywhere (a SIGKILL loses a tail), recover, reprocess the uncommitted
    batches: the totals equal a run without the crash, and every alert is raised exactly once (it
    is either in the recovered outbox or raised by the reprocessing, never both)."""
    life = LIFETIMES[lifetime]
    msgs, ids = _scenario(factory, 60)
    batches = [msgs[i : i + 37] for i in range(0, len(msgs), 37)]
    rules = load_config()
    clean = Processor(DictStore(), rules, lifetime=life)
    raised = [a.id for b in batches for a in clean.process(b)]
    want = {p: totals_of(clean, p) for p in range(3)}
    if lifetime == "expiring":
        assert sum(clean.stats(p).expired for p in range(3)) > 30  # most calls' states were dropped
    rng = random.Random(seed)
    first = Processor(DictStore(), rules, lifetime=life)
    done = rng.randrange(1, len(batches))
    for b in batches[:done]:
        first.process(b)
    log = first.store.changelog  # type: ignore[attr-defined]
    cut = rng.randrange(len(log) // 2, len(log) + 1)
    # Offsets were committed at most for batches whose writes were all flushed before the cut, and
    # only every few batches (Faust commits on an interval): the batches after are processed again,
    # some of them over states their own commit already dropped.
    every = rng.randint(1, 4)
    committed, n = 0, 0
    for i in range(every - 1, done, every):
        probe = Processor(DictStore(), rules, lifetime=life)
        for bb in batches[: i + 1]:
            probe.process(bb)
        if len(probe.store.changelog) <= cut:  # type: ignore[attr-defined]
            committed, n = i + 1, len(probe.store.changelog)  # type: ignore[attr-defined]
    assert n <= cut
    store = DictStore.replayed(log[:cut])
    second = Processor(store, rules, lifetime=life)
    second.recover(range(3))
    outbox = _outbox_ids(store)
    again = [a.id for b in batches[committed:] for a in second.process(b)]
    assert sorted(outbox + again) == sorted(raised)
    got = {p: totals_of(second, p) for p in range(3)}
    # A batch read again is skipped where its commit record survived, so a delivery whose call's state
    # was dropped meanwhile is not counted as late either.
    assert got == want
    assert sum(g["calls"] + g["chats"] for g in got.values()) == len(ids)


def totals_of(proc: Processor, p: int) -> dict[str, Any]:
    book = proc.book(p)
    t = book.totals.get(ALL)
    out = summarize(t) if t else summarize(Agg())
    out["chats"] = t.counts.get("chats", 0) if t else 0
    # late_events is counted in the windows too; a crash may count more of them (see the crash test).
    out["windows"] = {w: {**summarize(v[ALL]), "late_events": 0} for w, v in sorted(book.windows.items())}
    return out


def test_histogram_quantiles_are_within_two_percent() -> None:
    from streams.metrics import Effects

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


# -- state with a lifetime ------------------------------------------------------------------------

MIN = 60_000
SHORT = Lifetime(analyzed_ms=10 * MIN, idle_ms=60 * MIN)


def _deliver(proc: Processor, evs: list[Event], at: int, partition: int = 0) -> list[Alert]:
    return proc.process([as_in(e, at, partition) for e in evs])


def _live_calls(store: DictStore) -> set[bytes]:
    return set(store.keys_with_prefix(b"c:"))


def test_a_finished_calls_state_is_dropped_after_its_lifetime_with_a_tombstone(factory: CallFactory) -> None:
    proc = Processor(DictStore(), load_config(), lifetime=SHORT)
    store: DictStore = proc.store  # type: ignore[assignment]
    done = factory.events("completed", now_ms=T0)
    _deliver(proc, done, T0)
    once = totals(proc)
    key = b"c:" + done[0].key.encode()
    assert _live_calls(store) == {key}
    # Other calls move the partition's clock: 9 minutes on, the state is still there ...
    _deliver(proc, factory.events("completed", now_ms=T0 + 9 * MIN), T0 + 9 * MIN)
    assert key in _live_calls(store)
    # ... and 11 minutes on (10 after its analysis) it is gone, with a tombstone on the changelog.
    _deliver(proc, factory.events("completed", now_ms=T0 + 11 * MIN), T0 + 11 * MIN)
    assert key not in _live_calls(store)
    assert (0, key, None) in store.changelog
    assert proc.stats(0).expired == 1 and proc.stats(0).calls == 2
    t = totals(proc)
    assert t["calls"] == 3 and t["calls_analyzed"] == 3  # the running totals keep what it counted
    assert t["cost_total"] > once["cost_total"]


def test_a_call_never_analyzed_lives_the_idle_lifetime(factory: CallFactory) -> None:
    proc = Processor(DictStore(), load_config(), lifetime=SHORT)
    evs = factory.events("completed", now_ms=T0)
    _deliver(proc, [e for e in evs if e.event != "call_analyzed"], T0)
    key = b"c:" + evs[0].key.encode()
    _deliver(proc, factory.events("completed", now_ms=T0 + 30 * MIN), T0 + 30 * MIN)
    assert key in _live_calls(proc.store)  # type: ignore[arg-type]
    _deliver(proc, factory.events("completed", now_ms=T0 + 61 * MIN), T0 + 61 * MIN)
    assert key not in _live_calls(proc.store)  # type: ignore[arg-type]


def test_a_redelivery_after_the_state_is_gone_is_late_not_a_new_call(factory: CallFactory) -> None:
    got: list[Alert] = []
    proc = Processor(DictStore(), load_config(), got.append, lifetime=SHORT)
    evs = factory.events("error", now_ms=T0)
    _deliver(proc, evs, T0)
    _deliver(proc, factory.events("completed", now_ms=T0 + 2 * 60 * MIN), T0 + 2 * 60 * MIN)
    before = totals(proc)
    raised = len(got)
    # The platform delivers the call's analysis again two hours later (a fresh received_at).
    _deliver(proc, evs[-2:], T0 + 2 * 60 * MIN + 1)
    after = totals(proc)
    assert after["late_events"] == 2 and before["late_events"] == 0
    assert {k: v for k, v in after.items() if k != "late_events"} == {
        k: v for k, v in before.items() if k != "late_events"
    }
    assert len(got) == raised  # no alert for it again
    # Its repeats are recognised: the late call keeps a state of its own.
    _deliver(proc, evs[-2:], T0 + 2 * 60 * MIN + 2)
    assert totals(proc)["late_events"] == 2
    assert summarize(proc.book(0).totals[evs[0].payload["call"]["agent_id"]])["late_events"] == 2


def test_a_delivery_far_behind_the_clock_for_an_unknown_call_is_late(factory: CallFactory) -> None:
    proc = Processor(DictStore(), load_config(), lifetime=SHORT)
    _deliver(proc, factory.events("completed", now_ms=T0 + 60 * MIN), T0 + 60 * MIN)
    old = factory.events("completed", now_ms=T0)  # received an hour before the clock: its state may be gone
    _deliver(proc, old, T0)
    recent = factory.events("completed", now_ms=T0 + 55 * MIN)  # within the shortest lifetime: a new call
    _deliver(proc, recent, T0 + 55 * MIN)
    t = totals(proc)
    assert t["calls"] == 2 and t["late_events"] == len(old)  # each distinct delivery of it, once


def test_windows_older_than_a_day_are_tombstoned_and_never_come_back(factory: CallFactory) -> None:
    proc = Processor(DictStore(), load_config())
    store: DictStore = proc.store  # type: ignore[assignment]
    _deliver(proc, factory.events("completed", now_ms=T0), T0)
    day = 24 * 60 * MIN
    _deliver(proc, factory.events("completed", now_ms=T0 + day + MIN), T0 + day + MIN)
    assert T0 not in proc.book(0).windows
    assert (0, b"w:0:%d" % T0, None) in store.changelog
    # A crash loses everything after the commit record of that batch, the tombstone included:
    # the recovery drops the window again and the next commit writes its tombstone again.
    cut = max(i for i, (_, k, _) in enumerate(store.changelog) if k == b"p:0") + 1
    again = Processor(DictStore.replayed(store.changelog[:cut]), load_config())
    assert T0 not in again.book(0).windows
    assert b"w:0:%d" % T0 not in again.store.data  # type: ignore[attr-defined]
    _deliver(again, factory.events("completed", now_ms=T0 + day + 2 * MIN), T0 + day + 2 * MIN)
    assert (0, b"w:0:%d" % T0, None) in again.store.changelog  # type: ignore[attr-defined]
    # An event from before the day lands in the totals, not in a window that was dropped.
    late = factory.events("failed_dial", now_ms=T0 + day)
    _deliver(again, late, T0 + 5)
    assert T0 not in again.book(0).windows


def test_an_event_topic_with_unread_messages_holds_the_clock(factory: CallFactory) -> None:
    """A worker catching up reads small topics faster than big ones: a call's call_ended may still
    be unread on its topic when call_started's topic is hours ahead. Its state must wait for it."""
    unread = {"t.call_ended"}

    def horizon(topic: str, partition: int, offset: int) -> int | None:
        """Read to its end as of when the latest event read so far was read (what the worker learns)."""
        return None if topic in unread else proc.newest

    proc = Processor(
        DictStore(), load_config(), lifetime=SHORT, sources=["t.call_started", "t.call_ended"], horizon=horizon
    )
    evs = factory.events("completed", now_ms=T0)
    started, ended = evs[0], next(e for e in evs if e.event == "call_ended")
    proc.process([EventMessage(0, "call_started", started.key.encode(), started.body(), T0, "t.call_started", 0)])
    later = T0 + 3 * 60 * MIN
    ahead = factory.events("completed", now_ms=later)[0]
    proc.process([EventMessage(0, "call_started", ahead.key.encode(), ahead.body(), later, "t.call_started", 1)])
    assert proc.stats(0).clock == 0 and proc.stats(0).calls == 2  # call_ended's topic was never read
    proc.process([EventMessage(0, "call_ended", ended.key.encode(), ended.body(), T0 + 2 * MIN, "t.call_ended", 0)])
    assert proc.stats(0).clock == T0 + 2 * MIN and proc.stats(0).calls == 2
    unread.clear()  # read to its end: the clock takes the latest received_at
    proc.process([EventMessage(0, "call_ended", ended.key.encode(), ended.body(), T0 + 2 * MIN, "t.call_ended", 1)])
    assert proc.stats(0).clock == T0 + 3 * 60 * MIN and proc.stats(0).calls == 1
    assert totals(proc)["calls_ended"] == 1 and totals(proc)["late_events"] == 0


def test_an_alert_the_outbox_delivered_is_not_brought_back_by_recovery(factory: CallFactory) -> None:
    proc = Processor(DictStore(), load_config())
    store: DictStore = proc.store  # type: ignore[assignment]
    alerts = _deliver(proc, factory.events("failed_dial", now_ms=T0), T0)
    (key,) = [k for k in store.data if k.startswith(b"a:0:")]
    assert decode_pending(store.data[key]).alert == alerts[0]
    # Its batch's tail lost: the recovery restores the entry from the commit record ...
    cut = max(i for i, (_, k, _) in enumerate(store.changelog) if k == b"p:0") + 1
    lost = DictStore.replayed(store.changelog[:cut])
    Processor(lost, load_config()).recover([0])
    assert key in lost.data
    # ... but once the batch is whole (its end marker there) and the outbox deleted the entry, it stays gone.
    store.put(0, key, None)
    whole = DictStore.replayed(store.changelog)
    Processor(whole, load_config()).recover([0])
    assert key not in whole.data


def test_a_state_written_by_an_older_version_counts_its_lifetime_from_the_clock(factory: CallFactory) -> None:
    from streams.calls import CallState

    store = DictStore()
    store.put(0, b"c:old", msgspec.msgpack.encode(CallState(agent="a", seen=1)))
    proc = Processor(store, load_config(), lifetime=SHORT)
    _deliver(proc, factory.events("completed", now_ms=T0), T0)
    _deliver(proc, factory.events("completed", now_ms=T0 + 59 * MIN), T0 + 59 * MIN)
    assert b"c:old" in store.data
    _deliver(proc, factory.events("completed", now_ms=T0 + 62 * MIN), T0 + 62 * MIN)
    assert b"c:old" not in store.data


def test_a_tick_drops_what_the_clock_passed_without_events(factory: CallFactory) -> None:
    """Topics read to their end let the clock follow the newest event read anywhere: a partition
    that gets no more events still drops its states."""
    ends: dict[str, int] = {}
    proc = Processor(
        DictStore(),
        load_config(),
        lifetime=SHORT,
        sources=["t.a"],
        horizon=lambda topic, partition, offset: ends.get(topic),
    )
    evs = factory.events("completed", now_ms=T0)
    proc.process([EventMessage(0, e.event, e.key.encode(), e.body(), T0, "t.a", i) for i, e in enumerate(evs)])
    later = factory.events("completed", now_ms=T0 + 20 * MIN)
    proc.process(
        [EventMessage(1, e.event, e.key.encode(), e.body(), T0 + 20 * MIN, "t.a", i) for i, e in enumerate(later)]
    )
    assert proc.stats(0).calls == 1 and not proc.tick([0, 1])  # the ends are not known yet
    ends["t.a"] = proc.newest  # both partitions read to their ends as of the newest event read
    assert proc.tick([0, 1])
    assert proc.stats(0).calls == 0 and proc.stats(0).clock == T0 + 20 * MIN and proc.stats(1).calls == 1
    assert (0, b"c:" + evs[0].key.encode(), None) in proc.store.changelog  # type: ignore[attr-defined]
