"""Kafka stops and comes back under a running gateway: while it is away every delivery gets a 503
at once (not at the publish deadline) and /readyz says why; once it is back, 204s resume without a
restart. Every 204 is stored, and what was refused was never produced. Uses a broker of its own."""

from __future__ import annotations

import uuid

import orjson
import pytest

from callstream.localkafka import LocalKafka
from kernel.topics import ensure_topics
from tests.support.kafka import consume_all, topic_counts

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _body() -> bytes:
    call = {"call_id": f"call_{uuid.uuid4().hex}", "agent_id": "agent_h", "call_status": "ongoing"}
    return orjson.dumps({"event": "call_started", "call": call})


def _status(r) -> tuple[int, str | None, str | None]:
    return r.status_code, r.headers.get("retry-after"), r.json()["error"] if r.content else None


def test_kafka_away_means_503_at_once_and_its_return_means_204_again(
    own_broker: LocalKafka, make_gateway, post, prefix
):
    ensure_topics(own_broker.bootstrap, prefix, partitions=1)
    # A deadline longer than anything below should take: a 503 that waited for it says publish_timeout.
    gw = make_gateway(
        CALLSTREAM_KAFKA_BOOTSTRAP=own_broker.bootstrap, CALLSTREAM_PUBLISH_TIMEOUT_S="10", CALLSTREAM_RETRY_AFTER_S="3"
    )
    gw.wait_http("/readyz", ok=lambda r: r.status_code == 200)
    accepted = [_body()]
    assert post(gw, accepted[0]).status_code == 204

    own_broker.stop()
    r = gw.wait_http("/readyz", ok=lambda r: r.status_code == 503, timeout=30)
    assert r.json()["kafka"] == "unreachable"
    assert "no Kafka broker is reachable" in r.json()["reason"]
    refused = [_body() for _ in range(5)]
    for body in refused:
        assert _status(post(gw, body)) == (503, "3", "kafka_unavailable")

    own_broker.start(wait=120)
    assert gw.wait_http("/readyz", ok=lambda r: r.status_code == 200).json() == {"kafka": "ok"}
    accepted += [_body() for _ in range(3)]
    for body in accepted[1:]:
        assert post(gw, body).status_code == 204

    # Every 204 is on the topic, and nothing else: the refused bodies never reached librdkafka.
    assert topic_counts(own_broker.bootstrap, prefix)["call_started"] == len(accepted)
    stored = {m.value() for m in consume_all(own_broker.bootstrap, f"{prefix}.call_started", expect=len(accepted))}
    assert stored == set(accepted)
    # The log says it once each way.
    out = gw.output()
    assert out.count("deliveries get 503 until a broker answers") == 1
    assert out.count("a broker answers again; accepting deliveries") == 1
