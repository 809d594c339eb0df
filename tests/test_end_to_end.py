"""The whole path through real parts: HTTP -> gateway -> Kafka -> Faust worker and DuckDB sink."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import httpx
import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import free_port
from kernel.catalogue import Header
from kernel.signature import sign

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_signed_webhook_reaches_topic_worker_and_duckdb(
    topics, api_key, gateway_service, start_service, consume, kafka_bootstrap, service_env, tmp_path: Path
):
    web_port = free_port()
    worker = start_service("worker", "worker", "--web-port", str(web_port), url=f"http://127.0.0.1:{web_port}")
    sink = start_service("sink", "sink")

    events = CallFactory(Fleet(seed=3, agents=1), seed=3).events("completed")
    call_id = events[0].key
    agent_id = events[0].payload["call"]["agent_id"]
    for ev in events:
        body = ev.body()
        r = httpx.post(
            f"{gateway_service.url}/webhook",
            content=body,
            headers={"x-retell-signature": sign(body, api_key), "content-type": "application/json"},
        )
        assert r.status_code == 204, r.text

    # On its topic, keyed by the call, byte for byte, with the event header.
    analyzed = events[-1]
    msgs = consume(f"{topics}.call_analyzed", expect=1)
    assert len(msgs) == 1
    assert msgs[0].key() == call_id.encode()
    assert msgs[0].value() == analyzed.body()
    assert dict(msgs[0].headers())[Header.EVENT] == b"call_analyzed"

    # Counted by the running Faust worker, per event type and agent.
    want = {}
    for ev in events:
        want[ev.event] = want.get(ev.event, 0) + 1
    r = worker.wait_http(
        "/api/counts", timeout=90, ok=lambda r: r.status_code == 200 and r.json()["agents"].get(agent_id) == want
    )
    assert r.json()["agents"][agent_id] == want

    # A row in DuckDB: the sink's status file says so while it holds the lock; then we read the file.
    status = Path(service_env["CALLSTREAM_WAREHOUSE"]).with_suffix(".status.json")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if status.exists() and orjson.loads(status.read_bytes())["tables"]["calls"] == 1:
            break
        time.sleep(0.3)
    assert sink.stop() == 0, sink.output()[-3000:]
    con = duckdb.connect(service_env["CALLSTREAM_WAREHOUSE"], read_only=True)
    row = con.execute("SELECT call_id, agent_id, call_successful, duration_ms FROM calls").fetchall()
    assert row == [(call_id, agent_id, True, analyzed.payload["call"]["duration_ms"])]
