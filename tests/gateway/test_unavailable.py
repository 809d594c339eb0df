"""Kafka unreachable: 503 with Retry-After inside the deadline, /readyz says so, nothing is faked."""

from __future__ import annotations

import httpx
import pytest

from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import free_port

pytestmark = pytest.mark.kafka


def test_no_broker_means_503_with_retry_after_and_not_ready(make_gateway, post):
    gw = make_gateway(
        CALLSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",
        CALLSTREAM_PUBLISH_TIMEOUT_S="1.5",
        CALLSTREAM_RETRY_AFTER_S="7",
    )
    assert httpx.get(gw.url + "/healthz").status_code == 200
    r = httpx.get(gw.url + "/readyz", timeout=10)
    assert (r.status_code, r.json()) == (503, {"kafka": "unreachable"})
    ev = CallFactory(Fleet(seed=1), seed=1).events("completed")[0]
    r = post(gw, ev.body())
    assert r.status_code == 503
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"] == "publish_timeout"
    assert "1.5s" in r.json()["detail"]
    # A forgery is still a 401, whatever Kafka's state: nothing about the broker leaks to it.
    assert post(gw, ev.body(), signature=None).status_code == 401
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'callstream_gateway_requests_total{event="call_started",status="503"} 1.0' in metrics
    assert 'callstream_gateway_rejected_total{reason="publish_timeout"} 1.0' in metrics
