"""503 with Retry-After, for both ways Kafka can fail a delivery, and nothing is faked:
- no broker at all: the producer knows, so the answer comes at once (`kafka_unavailable`) and
  /readyz says why;
- a broker that answers but cannot acknowledge (acks=all with fewer in-sync replicas than the
  topic requires): the answer comes at the publish deadline (`publish_timeout`).
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import free_port
from kernel.topics import ensure_topics

pytestmark = pytest.mark.kafka


def _first_event() -> bytes:
    return CallFactory(Fleet(seed=1), seed=1).events("completed")[0].body()


def _metrics(gw) -> str:
    return httpx.get(gw.url + "/metrics").text


def test_no_broker_means_503_at_once_with_retry_after_and_not_ready(make_gateway, post):
    gw = make_gateway(
        CALLSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",
        # Far longer than the answers below take: a 503 that waited for it would say publish_timeout.
        CALLSTREAM_PUBLISH_TIMEOUT_S="10",
        CALLSTREAM_RETRY_AFTER_S="7",
    )
    assert httpx.get(gw.url + "/healthz").status_code == 200
    r = gw.wait_http("/readyz", ok=lambda r: "no Kafka broker is reachable" in r.json().get("reason", ""))
    assert (r.status_code, r.json()["kafka"]) == (503, "unreachable")
    r = post(gw, _first_event())
    assert r.status_code == 503
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"] == "kafka_unavailable"
    assert "no Kafka broker is reachable" in r.json()["detail"]
    # A forgery is still a 401, whatever Kafka's state: nothing about the broker leaks to it.
    assert post(gw, _first_event(), signature=None).status_code == 401
    metrics = _metrics(gw)
    assert 'callstream_gateway_requests_total{event="call_started",status="503"} 1.0' in metrics
    assert 'callstream_gateway_rejected_total{reason="kafka_unavailable"} 1.0' in metrics


@pytest.mark.slow
def test_a_broker_gone_silent_means_503_at_the_deadline(own_broker, prefix, make_gateway, post):
    ensure_topics(own_broker.bootstrap, prefix, partitions=1)
    gw = make_gateway(
        CALLSTREAM_KAFKA_BOOTSTRAP=own_broker.bootstrap,
        CALLSTREAM_PUBLISH_TIMEOUT_S="1.5",
        CALLSTREAM_RETRY_AFTER_S="7",
    )
    gw.wait_http("/readyz", ok=lambda r: r.status_code == 200)
    assert post(gw, _first_event()).status_code == 204
    # A stopped broker process (or a long GC pause) keeps its connections open and answers nothing:
    # librdkafka sees no error, so only the publish deadline answers.
    pid = own_broker.pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        r = post(gw, _first_event())
        assert (r.status_code, r.headers.get("retry-after")) == (503, "7")
        assert r.json()["error"] == "publish_timeout"
        assert "1.5s" in r.json()["detail"]
        ready = httpx.get(gw.url + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert "no Kafka broker answered a metadata request" in ready.json()["reason"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert 'callstream_gateway_rejected_total{reason="publish_timeout"} 1.0' in _metrics(gw)
    gw.wait_http("/readyz", ok=lambda r: r.status_code == 200)
