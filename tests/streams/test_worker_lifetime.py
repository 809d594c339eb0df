"""Acceptance: a real worker keeps live state, not history. Calls' states and old windows go by event
time (the `received_at` this test stamps), with tombstones on a compacted changelog; the totals stay
exact across that and across a SIGKILL; a redelivery after its call's state is gone is counted late.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from callstream.fakecalls import CallFactory, Event, Fleet
from callstream.localkafka import free_port
from callstream.procs import Process
from kernel.catalogue import Header, topic
from streams.settings import WorkerSettings
from streams.topics import CHANGELOG_CONFIG
from streams.worker import Worker
from tests.support.kafka import committed_lag, read_to_end

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MIN = 60_000
HOUR = 60 * MIN
# Event time starts a day and a bit ago, so the last phase, 25 hours on, is now.
T0 = int(time.time() * 1000) - 25 * HOUR - 10 * MIN
T0 -= T0 % MIN
LIFETIME = {"CALLSTREAM_CALL_TTL_ANALYZED_S": "60", "CALLSTREAM_CALL_TTL_IDLE_S": "600"}

Json = dict[str, Any]


class Clocked:
    """Produces calls straight to the topics as the gateway would, stamped with a `received_at` of our choosing."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.prefix = prefix
        self.factory = CallFactory(Fleet(seed=31, agents=2), seed=31, turns=(2, 3))
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        self.events = 0  # distinct events of the calls made (every one counts: transcripts grow)

    def send(self, events: list[Event], at: int, partition: int) -> None:
        for i, ev in enumerate(events):
            self.producer.produce(
                topic(self.prefix, ev.event),
                partition=partition,
                key=ev.key.encode(),
                value=ev.body(),
                headers=[(Header.EVENT, ev.event.encode()), (Header.RECEIVED_AT, str(at + i).encode())],
            )
        assert self.producer.flush(30) == 0

    def calls(self, n: int, at: int) -> list[list[Event]]:
        """`n` calls (and chats) one second apart from `at`, every event of each, spread evenly over
        the 3 partitions (call `i` on partition `i % 3`, as its clock moves only with its own events)."""
        out = []
        for i in range(n):
            evs = self.factory.events(now_ms=at + i * 1000)
            self.send(evs, at + i * 1000, i % 3)
            self.events += len(evs)
            out.append(evs)
        return out


@pytest.fixture
def clocked(kafka_bootstrap: str, topics: str) -> Iterator[Clocked]:
    yield Clocked(kafka_bootstrap, topics)


@pytest.fixture
def start_worker(start_service: Callable[..., Process]) -> Callable[[str], Process]:
    def start(name: str) -> Process:
        port = free_port()
        return start_service(name, "worker", "--web-port", str(port), url=f"http://127.0.0.1:{port}", env=LIFETIME)

    return start


def _get(worker: Process, path: str) -> Json:
    body: Json = httpx.get(f"{worker.url}{path}", timeout=10).json()
    return body


def _wait(worker: Process, what: str, ok: Callable[[Json, Json], bool], timeout: float = 120) -> tuple[Json, Json]:
    """Poll the worker's totals and state until `ok(overall, state)`."""
    deadline = time.monotonic() + timeout
    last: tuple[Json, Json] = ({}, {})
    while time.monotonic() < deadline:
        try:
            metrics, state = _get(worker, "/api/metrics?minutes=1"), _get(worker, "/api/state")
            last = (metrics["overall"], state)
            if metrics["complete"] and state["ready"] and ok(*last):
                return last
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if not worker.alive():
            raise AssertionError(f"the worker exited:\n{worker.output()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last: {last[0]}, state {last[1]}")


def _distinct(o: Json) -> int:
    return int(o["calls"] + o["chats_started"])


def _counted(o: Json) -> int:
    """Distinct events counted in the totals."""
    return sum(o["events"].values())


def _changelog(bootstrap: str, prefix: str) -> list[tuple[bytes, bytes | None]]:
    name = Worker(WorkerSettings(topic_prefix=prefix, kafka_bootstrap=bootstrap)).topics.changelog
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = next(iter(admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, name)]).values()))
    have = {k: v.value for k, v in config.result(timeout=15).items()}
    assert {k: have.get(k) for k in CHANGELOG_CONFIG} == CHANGELOG_CONFIG
    return [(m.key() or b"", m.value()) for m in read_to_end(bootstrap, name)]


def _totals(o: Json) -> Json:
    return {k: v for k, v in o.items() if k != "active_calls"}


def test_state_lives_its_lifetime_and_the_totals_stay_exact(
    kafka_bootstrap: str, topics: str, clocked: Clocked, start_worker: Callable[[str], Process]
) -> None:
    def all_counted(o: Json) -> bool:
        return _counted(o) == clocked.events

    worker = start_worker("worker")
    first = clocked.calls(24, T0)
    o, state = _wait(worker, "the first calls", lambda o, s: all_counted(o))
    assert _distinct(o) == 24 and state["calls"] == 24 and state["expired"] == 0

    # Ten minutes of event time later (their lifetime after analysis is one), new calls move the
    # partitions' clocks: the first calls' states go, the totals keep them.
    clocked.calls(24, T0 + 10 * MIN)
    o, state = _wait(worker, "the first states dropped", lambda o, s: all_counted(o) and s["expired"] == 24)
    assert _distinct(o) == 48 and state["calls"] == 24
    gone = {k for k, v in _changelog(kafka_bootstrap, topics) if v is None}
    assert {b"c:" + evs[0].key.encode() for evs in first} <= gone

    # A redelivery of a first call's last two events, with a fresh received_at: late, not a new call.
    before = o
    again = first[0][-2:]
    clocked.send(again, T0 + 10 * MIN + 30_000, partition=0)
    o, state = _wait(worker, "the late events", lambda o, s: o["late_events"] == 2)
    assert _totals({**o, "late_events": 0}) == _totals({**before, "late_events": 0})
    clocked.send(again, T0 + 10 * MIN + 31_000, partition=0)  # and again: its repeats are recognised
    o, state = _wait(worker, "the repeat read", lambda o, s: s["calls"] == 25)  # the late call's own state
    assert o["late_events"] == 2
    prometheus = httpx.get(f"{worker.url}/metrics", timeout=10).text
    assert 'callstream_late_events_total{agent="all"} 2.0' in prometheus
    assert 'callstream_state_keys{kind="calls",partition="0"} 9.0' in prometheus

    # SIGKILL: the restarted worker comes back with the same totals and only the live states. It reads
    # on from the offsets the first one committed: wait for them, as a worker that ran a while has
    # them (a delivery read again after its call's state was dropped would count as late once more).
    group = f"callstream-metrics-{topics}"
    deadline = time.monotonic() + 60
    while lag := committed_lag(kafka_bootstrap, group, topics):
        assert time.monotonic() < deadline, f"the worker did not commit its offsets: {lag}"
        time.sleep(0.5)
    worker.stop(signal.SIGKILL)
    restarted = start_worker("worker-restarted")
    _, state = _wait(restarted, "the same totals", lambda o2, s: _totals(o2) == _totals(o))
    assert state["calls"] == 25

    # A day and an hour on: the first minutes' windows are dropped too, with tombstones, and a
    # recovery does not bring them back.
    clocked.calls(6, T0 + 25 * HOUR)
    o, state = _wait(restarted, "the day-old state dropped", lambda o, s: all_counted(o) and s["calls"] == 6)
    assert _distinct(o) == 54 and o["late_events"] == 2
    old_windows = {b"w:%d:%d" % (p, T0 + m * MIN) for p in range(3) for m in range(12)}
    assert {k for k, v in _changelog(kafka_bootstrap, topics) if v is None} & old_windows
    local = _get(restarted, "/api/local")["books"]
    assert local and all(int(w) >= T0 + HOUR for book in local.values() for w in book["windows"])
