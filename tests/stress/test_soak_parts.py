"""The soak's own reckoning, without a broker: what the stored events owe agrees with the worker's rules on
the simulator's traffic, faults come in turn, pauses and catch-up are read right, and memory growth
is judged per process after the warm-up."""

from __future__ import annotations

import random
from collections import Counter

import orjson

from callstream.fakecalls import CallFactory, Fleet
from callstream.sim.traffic import schedule as traffic
from callstream.sim.traffic import with_duplicates
from streams.alertrules import load_config
from streams.calls import CallState, apply_event, decode_body
from tests.stress.soak import Lag, Options, _first_at_most, _longest_pause, _threshold, schedule
from tests.support.expected import AlertLog, Stored
from tests.support.rss import RssLog
from tests.support.stackaudit import REPOST_WINDOW_S, alerts_once


def test_what_the_stored_events_owe_is_what_the_worker_counts_and_raises() -> None:
    """The audit restates the worker's rules; on the simulator's mix (duplicates, reordering) both agree."""
    rules = load_config()
    factory = CallFactory(Fleet(seed=5, agents=3), seed=5)
    events = with_duplicates(traffic(factory, 400, reorder=0.2, rng=random.Random(5)), 0.1, random.Random(6))
    stored = Stored(rules=rules)
    offsets: Counter[str] = Counter()
    states: dict[str, CallState] = {}
    counts: Counter[str] = Counter()
    raised: set[str] = set()
    for ev, _ in events:
        body = ev.body()
        stored.add_event(ev.event, (f"t.{ev.event}", 0), offsets[ev.event], ev.key, body)
        offsets[ev.event] += 1
        state, effects, alerts = apply_event(states.get(ev.key), ev.event, decode_body(body), rules)
        states[ev.key] = state
        counts.update(effects.counts)
        raised |= {f"{a.rule}:{ev.key}" for a in alerts}
    worker = {k.removeprefix("event:"): n for k, n in counts.items() if k.startswith("event:")}
    assert stored.worker_counts() == worker
    assert len(stored.calls) == counts["calls"] and len(stored.chats) == counts["chats"]
    assert stored.owed_alerts == raised
    assert {a.split(":")[0] for a in raised} >= {"failed_dial", "error", "unsuccessful", "negative_sentiment"}
    kids = stored.child_rows()
    assert kids.utterances > 0 and kids.tool_calls > 0 and kids.messages > 0


def test_the_last_delivery_of_each_analyzed_key_is_found_below_the_stored_offset() -> None:
    stored = Stored()
    factory = CallFactory(Fleet(seed=2), seed=2)
    analyzed = [next(e for e in factory.events("completed") if e.event == "call_analyzed") for _ in range(3)]
    for offset, ev in enumerate([analyzed[0], analyzed[1], analyzed[0], analyzed[2]]):
        stored.add_event(ev.event, ("p.call_analyzed", 1), offset, ev.key, ev.body())
    keys = [e.key for e in analyzed]
    assert stored.last_deliveries("call_analyzed", {("p.call_analyzed", 1): 3}) == {(1, keys[0]): 2, (1, keys[1]): 1}
    assert stored.last_deliveries("chat_analyzed", {("p.call_analyzed", 1): 3}) == {}


def test_faults_come_in_turn_while_the_traffic_runs() -> None:
    hour = schedule(Options(minutes=60, fault_every=300))
    assert [f.at for f in hour] == [300.0 * k for k in range(1, 12)]
    assert [f.kind for f in hour] == ["worker", "sink", "gateway", "broker"] * 2 + ["worker", "sink", "gateway"]
    assert [f.kind for f in schedule(Options(minutes=3, fault_every=36))] == ["worker", "sink", "gateway", "broker"]


def test_the_longest_pause_in_204s_and_the_catch_up() -> None:
    assert _longest_pause([1.0, 2.0, 2.5, 9.0, 9.5], 0.0, 12.0) == (2.5, 9.0)
    assert _longest_pause([], 5.0, 8.0) == (5.0, 8.0)
    lags = [Lag(float(t), w, s) for t, w, s in [(0, 100, 0), (2, 120, 10), (4, 5000, None), (6, 900, 40), (8, 150, 9)]]
    assert _threshold(lags, "workers", before=4.0) == 220  # twice the median before the fault
    assert _threshold(lags, "sink", before=4.0) == 50  # at least the floor
    assert _first_at_most(lags, "workers", since=4.0, threshold=220) == 8.0
    assert _first_at_most(lags, "sink", since=4.0, threshold=50) == 6.0
    assert _first_at_most(lags, "workers", since=None, threshold=220) is None


def test_growth_is_judged_per_process_after_the_warm_up() -> None:
    log = RssLog()
    for minute, mb in enumerate([50, 80, 100, 104, 106]):
        log.add("worker", 1, minute * 60.0, mb)
    for minute, mb in enumerate([90, 95]):
        log.add("sink", 2, minute * 60.0, mb)
    log.started("sink", 3, 150.0)  # started again; its first sample comes at the next minute
    for minute, mb in zip(range(3, 8), [60, 70, 80, 100, 120], strict=True):
        log.add("sink", 3, minute * 60.0, mb)
    growth = {g.pid: g for g in log.growth(warmup=120.0)}
    assert (growth[1].baseline_mb, growth[1].end_mb, round(growth[1].percent or 0, 1)) == (100, 106, 6.0)
    assert growth[2].percent is None and "lived 150 s" in growth[2].why_not
    assert (growth[3].baseline_mb, growth[3].percent, growth[3].peak_mb) == (80, 50.0, 120)  # from its own minute 2


def _alert(i: str) -> dict[str, object]:
    return {"text": i, "alert": {"id": i, "call_id": f"call_{i}"}}


def test_an_alert_posted_again_only_across_a_worker_kill_is_the_documented_repost() -> None:
    """A second POST of an alert is excused only when the first arrived in the moment before a worker's
    SIGKILL and the second after it; any other second POST, or a third, fails the check."""
    log = AlertLog()
    for i in ("a", "b", "c"):
        log.add(orjson.dumps({"id": i, "call_id": f"call_{i}"}))
    kill = 1000.0
    deliveries = [(990.0, _alert("a")), (999.9, _alert("b")), (1003.0, _alert("b")), (1001.0, _alert("c"))]
    check = alerts_once(log, deliveries, {"a", "b", "c"}, 60, kills=[kill])[1]
    assert check.ok, check.detail
    assert "posted again by the worker that took over" in check.detail and "(b)" in check.detail

    for late_first, extra in ((kill - REPOST_WINDOW_S - 1, 1003.0), (1001.0, 1003.0)):
        twice = [*deliveries[:1], (late_first, _alert("b")), (extra, _alert("b")), deliveries[3]]
        failed = alerts_once(log, twice, {"a", "b", "c"}, 60, kills=[kill])[1]
        assert not failed.ok and "delivered more than once: 1 (('b', 2))" in failed.detail
    thrice = [*deliveries, (1004.0, _alert("b"))]
    assert not alerts_once(log, thrice, {"a", "b", "c"}, 60, kills=[kill])[1].ok
    assert not alerts_once(log, deliveries, {"a", "b", "c"}, 60, kills=[])[1].ok
