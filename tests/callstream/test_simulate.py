"""`callstream simulate`: signed exactly as retell-sdk verifies, the sender's habits, a true summary."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from retell.lib import webhook_auth

from callstream.localkafka import free_port
from callstream.sim.record import Acknowledged, body_digest, read_record
from callstream.simulate import SimulationPlan, SimulationResult, run
from tests.support.kafka import topic_counts


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the simulator opens dozens of connections at once
    daemon_threads = True


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the simulator expects
    seen: list[tuple[bytes, str]]
    answer = 204
    delay = 0.0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        time.sleep(self.delay)
        self.seen.append((body, self.headers.get("x-retell-signature", "")))
        self.send_response(self.answer)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[bytes, str]], type[_Recorder]]]:
    """A real HTTP server on loopback that keeps what it receives."""
    seen: list[tuple[bytes, str]] = []
    handler = type("Rec", (_Recorder,), {"seen": seen, "answer": 204})
    srv = _Server(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/webhook", seen, handler
    srv.shutdown()
    srv.server_close()


def test_retell_sdk_verifies_every_delivery_the_simulator_sends(recorder) -> None:
    url, seen, _ = recorder
    res = asyncio.run(run(url, "key_sim", SimulationPlan(calls=25, rate=0, duplicate_rate=0.2, seed=3)))
    assert len(seen) == res.sent == res.events + res.duplicates
    assert res.duplicates > 0
    for body, sig in seen:
        assert webhook_auth.verify(body.decode(), "key_sim", sig) is True
        assert webhook_auth.verify(body.decode(), "key_other", sig) is False
    # A duplicate delivery is the same body again (Retell sends no event id).
    assert sum(n - 1 for n in Counter(b for b, _ in seen).values()) == res.duplicates
    assert res.statuses == Counter({204: res.sent})
    assert {"call_started", "call_analyzed"} <= set(res.by_event)


def test_refusals_are_final_and_5xx_is_retried(recorder) -> None:
    url, seen, handler = recorder
    handler.answer = 503
    res = asyncio.run(run(url, "k", SimulationPlan(calls=1, rate=0, duplicate_rate=0, seed=1, concurrency=4)))
    assert res.failed == res.events and res.retries == 3 * res.events
    assert len(seen) == 4 * res.events  # first try and three retries, like Retell
    handler.answer = 401
    seen.clear()
    res = asyncio.run(run(url, "k", SimulationPlan(calls=1, rate=0, duplicate_rate=0, seed=1)))
    assert len(seen) == res.events and res.retries == 0


def test_duration_and_rate_bound_the_run(recorder) -> None:
    url, seen, _ = recorder
    res = asyncio.run(run(url, "k", SimulationPlan(duration=1.5, rate=40, duplicate_rate=0, seed=2)))
    assert 40 <= res.events <= 62
    assert len(seen) == res.sent


def test_the_record_names_every_acknowledged_delivery_and_nothing_else(recorder, tmp_path) -> None:
    url, seen, handler = recorder
    lines: list[str] = []
    plan = SimulationPlan(calls=20, rate=0, duplicate_rate=0.2, seed=6)
    res = asyncio.run(run(url, "k", plan, record=lines.extend))
    acked = [Acknowledged.parse(line) for line in lines]
    assert len(acked) == len(seen) == res.sent and res.duplicates > 0
    by_digest = {body_digest(body): orjson.loads(body) for body, _ in seen}
    assert {a.digest for a in acked} == set(by_digest)  # a duplicate is the same body again
    for a in acked:
        body = by_digest[a.digest]
        key = body["call"]["call_id"] if "call" in body else body["chat"]["chat_id"]
        assert (a.event, a.key) == (body["event"], key)
        assert abs(a.at_ms - time.time() * 1000) < 60_000
    handler.answer = 503  # refused every time: nothing is acknowledged, nothing recorded
    lines.clear()
    res = asyncio.run(run(url, "k", SimulationPlan(calls=1, rate=0, duplicate_rate=0, seed=1), record=lines.extend))
    assert res.failed == res.events > 0 and lines == []
    record = tmp_path / "acked.tsv"
    handler.answer = 204
    seen.clear()
    proc = _cli(url, "--calls", "5", "--rate", "0", "--seed", "2", "--record", str(record))
    assert proc.returncode == 0, proc.stderr
    assert sorted(a.digest for a in read_record(record)) == sorted(body_digest(b) for b, _ in seen)


def test_summary_names_statuses_and_percentiles() -> None:
    res = SimulationResult(sent=4, events=4, latencies_ms=[1.0, 2.0, 3.0, 100.0], seconds=1.0)
    res.statuses.update({204: 3, 503: 1, 0: 1})
    s = res.summary()
    assert "no answer: 1, 204: 3, 503: 1" in s and "p50 3.0 ms" in s and "p99 100.0 ms" in s
    assert "as fast as possible: achieved 4/s" in s and "scheduling lag" not in s


def test_summary_says_whether_the_rate_was_kept_and_by_how_much_not() -> None:
    # 100 planned deliveries at 100/s: the last is due at 0.99 s.
    kept = SimulationResult(events=100, rate=100, last_start=0.99, seconds=1.0, lags_ms=[0.1] * 100)
    assert "rate: asked 100/s, achieved 100/s\n" in kept.summary() and not kept.fell_behind
    late = SimulationResult(events=100, rate=100, last_start=1.99, seconds=2.0, lags_ms=[500.0] * 100)
    assert "asked 100/s, achieved 50/s: fell behind by 50/s (50% short)" in late.summary()
    assert "scheduling lag (delivery started after its planned time): p50 500.0 ms" in late.summary()
    cut = SimulationResult(events=60, unsent=40, rate=100, last_start=0.99, seconds=1.0)
    assert "achieved 60/s: fell behind by 40/s (40% short); 40 planned deliveries not sent" in cut.summary()


def test_several_sender_processes_share_the_plan(recorder) -> None:
    url, seen, _ = recorder
    res = asyncio.run(run(url, "k", SimulationPlan(calls=30, rate=0, duplicate_rate=0.1, seed=4, processes=2)))
    assert len(seen) == res.sent == res.events + res.duplicates and res.failed == 0
    assert len(res.calls) + len(res.chats) == 30
    assert "from 2 sender processes" in res.summary()


@pytest.mark.kafka
def test_simulate_command_against_a_real_gateway(topics, gateway_service, service_env, kafka_bootstrap, prefix):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "callstream",
            "simulate",
            "--url",
            gateway_service.url + "/webhook",
            "--calls",
            "40",
            "--rate",
            "400",
            "--duplicates",
            "0.1",
            "--seed",
            "5",
        ],
        env=service_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "simulate:" in proc.stderr and "req" in proc.stderr  # the progress bar
    m = re.search(
        r"sent (\d+) deliveries .*by status: 204: (\d+); never acknowledged: 0.*p50 [\d.]+ ms, "
        r"p95 [\d.]+ ms, p99 [\d.]+ ms",
        proc.stdout,
        re.S,
    )
    assert m, proc.stdout
    sent, ok = int(m.group(1)), int(m.group(2))
    assert sent == ok
    # Every 204 is one message: duplicates included, nothing else.
    assert sum(topic_counts(kafka_bootstrap, prefix).values()) == ok


# -- the summary tells the truth; each run is new unless its seed is given -----------------------


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    return subprocess.run(
        [sys.executable, "-m", "callstream", "simulate", "--url", url, "--key", "k", "--no-progress", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _ms(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, text
    return float(m.group(1))


def test_latency_is_the_servers_and_falling_behind_is_said(recorder) -> None:
    url, seen, handler = recorder
    handler.delay = 0.1  # the server's own response time
    # Two deliveries in flight answered in 100 ms each: at most ~20/s, of 200/s asked.
    proc = _cli(url, "--calls", "6", "--rate", "200", "--concurrency", "2", "--duplicates", "0", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    p50 = _ms(r"latency[^\n]*p50 ([\d.]+) ms", out)
    assert 95 <= p50 < 150, out  # the server's delay, not the seconds the sender fell behind
    asked = _ms(r"asked ([\d.]+)/s", out)
    achieved = _ms(r"achieved ([\d.]+)/s", out)
    assert asked == 200 and achieved < 40, out
    assert "fell behind" in out, out
    assert _ms(r"scheduling lag[^\n]*p50 ([\d.]+) ms", out) > 4 * p50, out
    assert len(seen) > 20


def _call_ids(seen: list[tuple[bytes, str]]) -> set[str]:
    return {
        str(b["call"]["call_id"] if "call" in b else b["chat"]["chat_id"])
        for b in (orjson.loads(body) for body, _ in seen)
    }


def test_each_run_sends_new_calls_and_says_its_seed_unless_one_is_given(recorder) -> None:
    url, seen, _ = recorder
    runs = []
    for args in ((), (), ("--seed", "7"), ("--seed", "7")):
        seen.clear()
        proc = _cli(url, "--calls", "4", "--rate", "0", *args)
        assert proc.returncode == 0, proc.stderr
        runs.append((_call_ids(seen), re.findall(r"seed (\d+)", proc.stdout + proc.stderr)))
    (ids1, said1), (ids2, said2), (ids3, said3), (ids4, said4) = runs
    assert ids1 and not ids1 & ids2  # a second run shows new calls
    assert ids3 == ids4  # a given seed repeats the traffic
    assert said1 and said2 and said1 != said2, runs  # and each run says the seed that repeats it
    assert set(said3) == set(said4) == {"7"}


def test_no_gateway_is_retried_then_said_in_one_summary_and_a_failed_exit() -> None:
    proc = _cli(f"http://127.0.0.1:{free_port()}/webhook", "--calls", "2", "--rate", "0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        "no answer: " in proc.stdout and "server latency (request written to response read): no answer" in proc.stdout
    )
    bad = _cli("127.0.0.1:8000/webhook", "--calls", "1")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "not an http(s) URL" in bad.stderr
