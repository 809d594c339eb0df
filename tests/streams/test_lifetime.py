"""How long a call's state lives, and the index of live calls by due time."""

from __future__ import annotations

from streams.calls import EVENT_BIT, CallState
from streams.lifetime import Expiry, Lifetime

H = 3600 * 1000
LIFE = Lifetime(analyzed_ms=6 * H, idle_ms=24 * H)


def test_a_finished_call_lives_the_analyzed_lifetime_any_other_the_idle_one() -> None:
    ongoing = CallState(agent="a", seen=EVENT_BIT["call_started"], last_at=1000)
    analyzed = CallState(agent="a", seen=EVENT_BIT["call_analyzed"], last_at=1000)
    chat = CallState(agent="a", seen=EVENT_BIT["chat_analyzed"], last_at=1000)
    assert LIFE.expires_at(ongoing, clock=0) == 1000 + 24 * H
    assert LIFE.expires_at(analyzed, clock=0) == LIFE.expires_at(chat, clock=0) == 1000 + 6 * H
    assert LIFE.expires_at(CallState(agent="a"), clock=5000) == 5000 + 24 * H  # no last_at: from the clock
    assert LIFE.shortest == 6 * H and LIFE.bucket_ms == 6 * H // 100


def test_late_is_behind_the_clock_or_long_after_the_calls_own_time() -> None:
    clock = 100 * H
    assert LIFE.is_late(clock - 7 * H, call_at=None, clock=clock)
    assert not LIFE.is_late(clock - 5 * H, call_at=None, clock=clock)
    assert LIFE.is_late(clock, call_at=clock - 7 * H, clock=clock)  # a redelivery hours later
    assert not LIFE.is_late(clock, call_at=clock - 10 * 60_000, clock=clock)  # a call of ten minutes ago
    assert not LIFE.is_late(clock, call_at=clock + 60_000, clock=clock)  # its end is ahead of the gateway's clock


def test_expiry_pops_what_the_clock_reached_once_and_follows_changes() -> None:
    index = Expiry(bucket_ms=10)
    index.set(b"a", 100)
    index.set(b"b", 105)
    index.set(b"c", 300)
    index.set(b"b", 400)  # b changed: due later
    assert len(index) == 3 and b"b" in index
    assert index.pop_due(99, 100) == []
    assert index.pop_due(100, 100) == [b"a"]
    assert index.pop_due(100, 100) == []
    index.discard(b"c")
    assert index.pop_due(350, 100) == [] and len(index) == 1
    index.set(b"d", 5)  # due in the past: the next pop takes it
    assert sorted(index.pop_due(400, 100)) == [b"b", b"d"] and len(index) == 0


def test_expiry_rounds_due_times_up_to_its_bucket() -> None:
    index = Expiry(bucket_ms=60)
    index.set(b"a", 61)
    assert index.pop_due(119, 100) == [] and index.pop_due(120, 100) == [b"a"]


def test_expiry_gives_about_limit_keys_at_a_time_and_keeps_the_rest_due() -> None:
    index = Expiry(bucket_ms=10)
    for i in range(100):
        index.set(b"k%d" % i, 10 * (i // 10 + 1))  # ten buckets of ten keys
    first = index.pop_due(1000, limit=25)
    assert len(first) == 30  # whole buckets: up to the one that reached the limit
    rest = index.pop_due(1000, limit=1000)
    assert len(rest) == 70 and not set(first) & set(rest) and len(index) == 0
