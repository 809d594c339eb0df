"""Acceptance: the real gateway, broker and worker processes, with an alert webhook server in the test."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from callstream.fakecalls import CallFactory, Event, Fleet
from callstream.localkafka import free_port
from callstream.procs import Process, ProcessFailed
from callstream.simulate import SimulationPlan, SimulationResult
from callstream.simulate import run as simulate
from kernel.signature import sign
from streams.metrics import exact_quantile
from tests.support.alerts import call_alerts, expected_call_alerts, received_alert_ids, topic_alert_ids
from tests.support.receiver import Receiver

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

Json = dict[str, Any]


class Hook:
    """A Slack-like webhook endpoint: records every POSTed body."""

    def __init__(self) -> None:
        self.bodies: list[Json] = []
        received = self.bodies

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_port}/hook"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.srv.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def start_worker(start_service: Callable[..., Process], tmp_path: Path) -> Callable[..., Process]:
    cfg = tmp_path / "alerts.toml"
    cfg.write_text("[failure_rate]\ncheck_seconds = 1\n")

    def start(env: dict[str, str] | None = None, name: str = "worker") -> Process:
        port = free_port()
        return start_service(
            name,
            "worker",
            "--web-port",
            str(port),
            url=f"http://127.0.0.1:{port}",
            env={"CALLSTREAM_ALERTS_CONFIG": str(cfg), **(env or {})},
        )

    return start


def post_all(gateway: Process, key: str, events: list[Event]) -> None:
    with httpx.Client(timeout=15) as c:
        for ev in events:
            body = ev.body()
            r = c.post(
                f"{gateway.url}/webhook",
                content=body,
                headers={"x-retell-signature": sign(body, key), "content-type": "application/json"},
            )
            assert r.status_code == 204, r.text


def wait_metrics(worker: Process, ok: Callable[[Json], bool], timeout: float = 120) -> Json:
    last: list[Json] = []

    def check(r: httpx.Response) -> bool:
        if r.status_code != 200:
            return False
        last[:] = [r.json()]
        return ok(last[0])

    try:
        r = worker.wait_http("/api/metrics?minutes=60", timeout=timeout, ok=check)
    except ProcessFailed as exc:  # say what the API showed last, not only the log
        shown = {k: v for k, v in last[0].items() if k != "agents"} if last else None
        raise AssertionError(f"{exc}\nlast /api/metrics: {shown}") from None
    body: Json = r.json()
    return body


def test_scripted_scenario_exact_metrics_and_alerts(
    topics: str, api_key: str, gateway_service: Process, start_worker: Callable[..., Process], hook: Hook
) -> None:
    worker = start_worker({"CALLSTREAM_ALERT_WEBHOOK_URL": hook.url})
    wait_metrics(worker, lambda m: m["complete"])
    fleet = Fleet(seed=21, agents=2)
    good, bad = fleet.agent_ids
    f = CallFactory(fleet, seed=21, turns=(4, 8))
    calls: dict[str, list[Event]] = {}

    def call(scenario: str, agent: str) -> list[Event]:
        evs = f.events(scenario, agent_id=agent) if scenario != "chat" else f.events("chat", agent_id=agent)
        calls[evs[0].key] = evs
        return evs

    dup = call("completed", good)
    late = call("completed", good)
    plain = call("completed", good)
    bridged = call("transfer_bridged", good)
    cancelled = call("transfer_cancelled", good)
    chat = call("chat", good)
    failed = [call("failed_dial", bad) for _ in range(5)]
    error = call("error", bad)
    late_analysis = [e for e in late if e.event == "call_analyzed"]
    send = (
        [e for e in dup for _ in range(2)]  # every delivery retried
        + [e for e in late if e.event != "call_analyzed"]
        + plain
        + bridged
        + cancelled
        + chat
        + error
        + [e for evs in failed for e in evs]
        + cancelled[-2:]  # a late retry of call_ended / call_analyzed
    )
    post_all(gateway_service, api_key, send)
    post_all(gateway_service, api_key, late_analysis)  # analysis long after the call ended

    phone = [evs for cid, evs in calls.items() if not cid.startswith("chat_")]
    ended = [next(e for e in evs if e.event == "call_ended").payload["call"] for evs in phone]
    connected = [c for c in ended if c["call_status"] != "not_connected"]
    m = wait_metrics(
        worker, lambda m: m["overall"]["calls_analyzed"] == len(phone) and m["overall"]["chats_analyzed"] == 1
    )
    o = m["overall"]
    assert (o["calls"], o["calls_started"], o["calls_ended"], o["calls_analyzed"]) == (11, 6, 11, 11)
    assert (o["connected"], o["not_connected"], o["failed"], o["active_calls"]) == (6, 5, 6, 0)
    assert o["failure_rate"] == round(6 / 11, 4)
    assert (o["calls_successful"], o["calls_unsuccessful"], o["success_rate"]) == (4, 7, round(4 / 11, 4))
    assert (o["transfers_started"], o["transfers_bridged"], o["transfers_cancelled"]) == (2, 1, 1)
    assert o["disconnection_reasons"] == dict(Counter(c["disconnection_reason"] for c in ended))
    assert o["sentiment"] == dict(
        Counter(
            next(e for e in evs if e.event == "call_analyzed").payload["call"]["call_analysis"]["user_sentiment"]
            for evs in phone
        )
    )
    assert o["cost_total"] == pytest.approx(sum(c["call_cost"]["combined_cost"] for c in ended), abs=1e-3)
    durations = [c["duration_ms"] for c in connected]
    assert o["duration_p50_ms"] == pytest.approx(exact_quantile(durations, 0.5), rel=0.02)
    assert o["duration_p95_ms"] == pytest.approx(exact_quantile(durations, 0.95), rel=0.02)
    assert o["e2e_latency_p50_ms"] == pytest.approx(
        exact_quantile([c["latency"]["e2e"]["p50"] for c in connected], 0.5), rel=0.02
    )
    chat_ok = chat[-1].payload["chat"]["chat_analysis"]["chat_successful"]
    assert (o["chats_started"], o["chats_ended"], o["chats_successful"]) == (1, 1, int(chat_ok))
    assert m["agents"][bad]["failed"] == 6 and m["agents"][good]["failed"] == 0
    assert sum(w["overall"]["calls"] for w in m["windows"]) == 11

    def cid(evs: list[Event]) -> str:
        return evs[0].key

    want = (
        {f"failed_dial:{cid(evs)}" for evs in failed}
        | {f"error:{cid(error)}", f"unsuccessful:{cid(error)}"}
        | {
            f"transfer_cancelled:{cid(cancelled)}",
            f"unsuccessful:{cid(cancelled)}",
            f"negative_sentiment:{cid(cancelled)}",
        }
    )

    def alert_ids(body: Json) -> list[str]:
        return [a["id"] if a["rule"] != "failure_rate" else f"failure_rate:{a['agent_id']}" for a in body["alerts"]]

    want_all = want | {f"failure_rate:{bad}"}
    r = worker.wait_http("/api/alerts", ok=lambda r: set(alert_ids(r.json())) == want_all)
    assert sorted(alert_ids(r.json())) == sorted(want_all)  # on the alerts topic, each once
    deadline = time.monotonic() + 30
    while len(hook.bodies) < len(want_all) and time.monotonic() < deadline:
        time.sleep(0.2)
    got = [
        b["alert"]["id"] if b["alert"]["rule"] != "failure_rate" else f"failure_rate:{b['alert']['agent_id']}"
        for b in hook.bodies
    ]
    assert sorted(got) == sorted(want_all)
    assert all(b["text"] for b in hook.bodies)


def _distinct(res: SimulationResult) -> int:
    return len(res.calls) + len(res.chats)


def _seen(m: Json) -> int:
    """Distinct calls and chats the group has counted."""
    return int(m["overall"]["calls"] + m["overall"]["chats_started"])


def _simulate(gateway: Process, key: str, calls: int, seed: int, rate: float = 150.0) -> SimulationResult:
    return asyncio.run(
        simulate(
            f"{gateway.url}/webhook",
            key,
            SimulationPlan(calls=calls, rate=rate, duplicate_rate=0.1, seed=seed, agents=3),
        )
    )


def _wait(what: str, ok: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _delivered(workers: list[Process]) -> int:
    """Per-call alerts the workers delivered and deleted from their outboxes."""
    return sum(httpx.get(f"{w.url}/api/state", timeout=5).json()["outbox"]["delivered"] for w in workers)


def _kill_with_alerts_in_flight(worker: Process, others: list[Process], hook: Receiver) -> None:
    """SIGKILL `worker` while its outbox holds alerts that it may have posted but got no answer for:
    the receiver holds every POST from now on, and answers them 503 once the worker is dead. Every
    alert the receiver did answer is settled first (its outbox entry deleted): the moment between a
    webhook's answer and that deletion is the one a crash can repost an alert from (see streams/outbox.py)."""
    _wait("a per-call alert at the receiver", lambda: bool(call_alerts(received_alert_ids(hook.received()))))
    hook.hold()
    n = len(call_alerts(received_alert_ids(hook.received())))
    _wait(f"{n} alerts settled", lambda: _delivered([worker, *others]) == n)
    _wait("an alert posted and not answered", lambda: hook.held > 0)
    worker.stop(signal.SIGKILL)
    hook.release()


def _assert_each_alert_once(bootstrap: str, prefix: str, hook: Receiver) -> None:
    """Every per-call alert the events raise is on the alerts topic and at the webhook, and no alert
    (per-call or failure-rate) is on either twice."""
    want = expected_call_alerts(bootstrap, prefix)
    assert want, "the traffic raised no per-call alert"

    def arrived() -> bool:
        on_topic = call_alerts(topic_alert_ids(bootstrap, prefix))
        return set(on_topic) >= want and set(call_alerts(received_alert_ids(hook.received()))) >= want

    _wait(f"{len(want)} per-call alerts on the topic and at the webhook", arrived)
    on_topic, received = topic_alert_ids(bootstrap, prefix), received_alert_ids(hook.received())
    assert set(call_alerts(on_topic)) == set(call_alerts(received)) == want
    assert [k for k, n in on_topic.items() if n > 1] == []
    assert [k for k, n in received.items() if n > 1] == []
    assert all(h.get("Idempotency-Key") for h in hook.headers)


def test_sigkill_mid_stream_then_restart_counts_each_call_once(
    topics: str,
    api_key: str,
    kafka_bootstrap: str,
    gateway_service: Process,
    start_worker: Callable[..., Process],
    receiver: Receiver,
) -> None:
    hook = receiver
    env = {"CALLSTREAM_ALERT_WEBHOOK_URL": hook.url}
    w1 = start_worker(env)
    wait_metrics(w1, lambda m: m["complete"])
    results = []
    t = threading.Thread(target=lambda: results.append(_simulate(gateway_service, api_key, 160, seed=5)))
    t.start()
    wait_metrics(w1, lambda m: m["overall"]["calls"] >= 30)
    _kill_with_alerts_in_flight(w1, [], hook)
    t.join()
    res = results[0]
    assert res.failed == 0
    w2 = start_worker(env, name="worker-restarted")
    m = wait_metrics(
        w2,
        lambda m: (
            m["complete"]
            and _seen(m) == _distinct(res)
            and m["overall"]["calls_analyzed"] == len(res.calls)
            and m["overall"]["active_calls"] == 0
        ),
    )
    assert _seen(m) == _distinct(res)
    assert m["overall"]["calls_ended"] == len(res.calls)
    assert m["overall"]["chats_started"] == len(res.chats)
    _assert_each_alert_once(kafka_bootstrap, topics, hook)


def test_two_workers_share_partitions_and_one_carries_on(
    topics: str,
    api_key: str,
    kafka_bootstrap: str,
    gateway_service: Process,
    start_worker: Callable[..., Process],
    receiver: Receiver,
) -> None:
    hook = receiver
    env = {"CALLSTREAM_ALERT_WEBHOOK_URL": hook.url}
    a = start_worker(env, name="worker-a")
    b = start_worker(env, name="worker-b")
    both = wait_metrics(a, lambda m: m["complete"] and len(m["workers"]) == 2, timeout=180)
    assert len(both["partitions"]) == 3
    local_a = httpx.get(f"{a.url}/api/local", timeout=5).json()["books"]
    local_b = httpx.get(f"{b.url}/api/local", timeout=5).json()["books"]
    assert local_a and local_b and not set(local_a) & set(local_b)  # each owns some partitions

    first = _simulate(gateway_service, api_key, 60, seed=8)
    # A call is "seen" at its first event, and the sender may deliver call_ended after
    # call_analyzed (it does not wait between them), so wait for every count to arrive.
    m = wait_metrics(
        b,
        lambda m: (
            m["complete"]
            and _seen(m) == _distinct(first)
            and m["overall"]["calls_analyzed"] == m["overall"]["calls_ended"] == len(first.calls)
        ),
    )
    # About 18 s of traffic: b dies with alerts in flight, traffic keeps arriving while the group
    # notices b is gone (the session timeout is 10 s) and a takes over b's partitions, so a
    # rebalances with batches in hand.
    results = []
    t = threading.Thread(target=lambda: results.append(_simulate(gateway_service, api_key, 60, seed=9, rate=20)))
    t.start()
    _kill_with_alerts_in_flight(b, [a], hook)
    t.join()
    second = results[0]
    total = _distinct(first) + _distinct(second)
    analyzed = len(first.calls) + len(second.calls)
    m = wait_metrics(
        a,
        lambda m: (
            m["complete"]
            and len(m["workers"]) == 1
            and _seen(m) == total
            and m["overall"]["calls_analyzed"] == m["overall"]["calls_ended"] == analyzed
        ),
        timeout=180,
    )
    assert m["partitions"] == [0, 1, 2]
    _assert_each_alert_once(kafka_bootstrap, topics, hook)
