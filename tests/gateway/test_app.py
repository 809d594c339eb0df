"""Every status of the contract, against a real gateway process and the real broker."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from callstream.fakecalls import CallFactory, Fleet
from kernel.catalogue import EVENT_NAMES, Header
from kernel.signature import sign

pytestmark = pytest.mark.kafka


def _headers(msg) -> dict[str, bytes]:
    return dict(msg.headers())


def test_signed_events_are_on_their_topics_byte_for_byte_before_204(topics, gateway_service, post, consume):
    evs = CallFactory(Fleet(seed=11), seed=11).events("transfer_bridged") + CallFactory(Fleet(seed=11), seed=12).events(
        "chat"
    )
    for ev in evs:
        r = post(gateway_service, ev.body())
        assert r.status_code == 204, r.text
        assert r.content == b""
    for ev in evs:
        want = [e for e in evs if e.event == ev.event]
        msgs = consume(f"{topics}.{ev.event}", expect=len(want))
        assert sorted(m.value() for m in msgs) == sorted(e.body() for e in want)
        for m in msgs:
            assert m.key() == ev.key.encode()
            h = _headers(m)
            assert h[Header.EVENT] == ev.event.encode()
            assert re.fullmatch(rb"\d{13}", h[Header.RECEIVED_AT])
            assert re.fullmatch(rb"\d{13}", h[Header.SIGNED_AT])


def test_unknown_event_type_is_kept_on_unknown(topics, gateway_service, post, consume):
    body = orjson.dumps({"event": "call_recording_ready", "call": {"call_id": "call_x1", "url": "https://r"}})
    assert post(gateway_service, body).status_code == 204
    [m] = consume(f"{topics}.unknown", expect=1)
    assert (m.key(), m.value(), _headers(m)[Header.EVENT]) == (b"call_x1", body, b"call_recording_ready")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json at all", b"not valid JSON"),
        (b'{"event":"call_ended","call":{"agent_id":"a"}}', b"no call.call_id"),
        (b'["call_ended"]', b"not a webhook event"),
    ],
)
def test_signed_unroutable_body_is_4xx_and_kept_on_dead_letter(
    topics, gateway_service, post, consume, counts, body, reason
):
    r = post(gateway_service, body)
    assert r.status_code == 422
    assert r.json()["error"] == "bad_payload"
    assert "dead-letter" in r.json()["detail"]
    [m] = consume(f"{topics}.dead_letter", expect=1)
    assert m.value() == body
    assert reason in _headers(m)[Header.REASON]
    assert sum(n for t, n in counts().items() if t != "dead_letter") == 0


def test_unsigned_forged_stale_and_malformed_are_401_and_nothing_is_stored(
    topics, gateway_service, post, counts, api_key
):
    body = CallFactory(Fleet(seed=1), seed=1).events("completed")[0].body()
    cases = {
        "missing_signature": None,
        "malformed_signature": "sha256=deadbeef",
        "bad_signature": sign(body, "key_of_someone_else"),
        "stale_signature": sign(body, api_key, timestamp_ms=1_600_000_000_000),
    }
    for reason, sig in cases.items():
        r = post(gateway_service, body, signature=sig)
        assert r.status_code == 401, (reason, r.text)
        assert r.json()["error"] == reason
    # A valid signature over a different body (tampered in transit).
    r = post(gateway_service, body + b" ", signature=sign(body, api_key))
    assert r.status_code == 401
    assert counts() == dict.fromkeys(counts(), 0)


def test_body_over_the_limit_is_413_and_nothing_is_stored(topics, make_gateway, post, counts):
    gw = make_gateway(CALLSTREAM_MAX_BODY_BYTES="20000")
    big = CallFactory(Fleet(seed=1), seed=1, turns=(20, 20)).events("completed")[-1].body()
    assert len(big) > 20000
    assert post(gw, big).status_code == 413  # refused on Content-Length, before reading
    # Chunked, no Content-Length: refused while streaming.
    r = httpx.post(
        f"{gw.url}/webhook",
        content=iter([big[i : i + 4096] for i in range(0, len(big), 4096)]),
        headers={"x-retell-signature": sign(big, "k")},
        timeout=15,
    )
    assert r.status_code == 413
    assert r.json()["error"] == "too_large"
    small = CallFactory(Fleet(seed=1), seed=1).events("completed")[0].body()
    assert post(gw, small).status_code == 204
    assert sum(counts().values()) == 1


def test_allowlist_believes_forwarded_for_only_from_trusted_proxies(topics, make_gateway, post, consume, counts):
    ev = CallFactory(Fleet(seed=1), seed=1).events("completed")[0]
    behind_proxy = make_gateway(CALLSTREAM_ALLOWED_SOURCES="100.20.5.228", CALLSTREAM_TRUSTED_PROXIES="127.0.0.1")
    assert post(behind_proxy, ev.body(), x_forwarded_for="100.20.5.228").status_code == 204
    [m] = consume(f"{topics}.call_started", expect=1)
    assert _headers(m)[Header.SOURCE_IP] == b"100.20.5.228"
    r = post(behind_proxy, ev.body())  # straight from the proxy itself
    assert (r.status_code, r.json()["error"]) == (403, "source_not_allowed")
    assert post(behind_proxy, ev.body(), x_forwarded_for="198.51.100.7").status_code == 403
    # Prepending the allowed address does not help: our proxy appended the real one.
    assert post(behind_proxy, ev.body(), x_forwarded_for="100.20.5.228, 198.51.100.7").status_code == 403

    no_proxies = make_gateway(CALLSTREAM_ALLOWED_SOURCES="100.20.5.228")
    assert post(no_proxies, ev.body(), x_forwarded_for="100.20.5.228").status_code == 403
    loopback = make_gateway(CALLSTREAM_ALLOWED_SOURCES="127.0.0.0/8")
    assert post(loopback, ev.body()).status_code == 204
    assert counts()["call_started"] == 2


def test_health_ready_and_openapi(gateway_service):
    assert httpx.get(gateway_service.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(gateway_service.url + "/readyz", timeout=10)
    assert (r.status_code, r.json()) == (200, {"kafka": "ok"})
    spec = httpx.get(gateway_service.url + "/openapi.json").json()
    op = spec["paths"]["/webhook"]["post"]
    assert set(op["responses"]) >= {"204", "401", "413", "422", "503"}
    assert op["requestBody"]["content"]["application/json"]["schema"]["properties"]["event"]["enum"] == list(
        EVENT_NAMES
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_by_event_and_status_and_rejections_by_reason(topics, gateway_service, post):
    evs = CallFactory(Fleet(seed=6), seed=6).events("completed")
    for ev in evs:
        assert post(gateway_service, ev.body()).status_code == 204
    post(gateway_service, evs[0].body(), signature=None)
    post(gateway_service, evs[0].body(), signature=sign(evs[0].body(), "nope"))
    post(gateway_service, b"{}")
    m = _samples(httpx.get(gateway_service.url + "/metrics").text)
    req = "callstream_gateway_requests_total"
    assert m[(req, (("event", "call_started"), ("status", "204")))] == 1
    assert m[(req, (("event", "transcript_updated"), ("status", "204")))] == 3
    assert m[(req, (("event", "-"), ("status", "401")))] == 2
    assert m[(req, (("event", "-"), ("status", "422")))] == 1
    rej = "callstream_gateway_rejected_total"
    assert m[(rej, (("reason", "missing_signature"),))] == 1
    assert m[(rej, (("reason", "bad_signature"),))] == 1
    assert m[(rej, (("reason", "bad_payload"),))] == 1
    assert m[("callstream_gateway_request_seconds_count", ())] == len(evs) + 3
    # Every publish (the dead letter included) is timed to its acknowledgement.
    assert m[("callstream_gateway_produce_seconds_count", ())] == len(evs) + 1
    assert m[("callstream_gateway_in_flight", ())] == 0


def test_logs_never_contain_a_key_a_signature_or_a_transcript(topics, make_gateway, post, api_key, consume):
    gw = make_gateway("--log-level", "DEBUG")
    ev = CallFactory(Fleet(seed=8), seed=8).events("completed")[-1]
    marker = "Zanzibar-transcript-marker-7f3a"
    ev.payload["call"]["transcript"] = marker
    body = ev.body()
    good = sign(body, api_key)
    sent = [good, sign(body, "wrong_key_abc"), sign(body, api_key, 1_600_000_000_000)]
    assert post(gw, body, signature=good).status_code == 204
    assert post(gw, body, signature=sent[1]).status_code == 401
    assert post(gw, body, signature=sent[2]).status_code == 401
    assert post(gw, orjson.dumps({"event": "call_ended", "call": {"transcript": marker}})).status_code == 422
    assert post(gw, b'{"event":"call_ended", "transcript": "' + marker.encode() + b'"').status_code == 422
    consume(f"{topics}.dead_letter", expect=2)
    out = gw.output()
    assert "rejected status=401 reason=bad_signature" in out  # the log is really captured
    assert "accepted event=call_analyzed" in out
    for secret in (api_key, marker, *(s.split(",d=")[1] for s in sent)):
        assert secret not in out


def test_several_worker_processes_serve_the_same_contract(topics, make_gateway, post, consume, counts):
    gw = make_gateway(gateway_args=("--workers", "2"))
    gw.wait_http("/readyz", ok=lambda r: r.status_code == 200)
    evs = CallFactory(Fleet(seed=9), seed=9).events("completed")
    for ev in evs:
        assert post(gw, ev.body()).status_code == 204
    assert post(gw, evs[0].body(), signature=None).status_code == 401
    assert len(consume(f"{topics}.transcript_updated", expect=3)) == 3
    assert sum(counts().values()) == len(evs)
    # /metrics sums every worker, whichever one answers the scrape.
    for _ in range(4):
        m = _samples(httpx.get(gw.url + "/metrics").text)
        assert m[("callstream_gateway_requests_total", (("event", "transcript_updated"), ("status", "204")))] == 3
        assert m[("callstream_gateway_rejected_total", (("reason", "missing_signature"),))] == 1
    # SIGTERM stops the supervisor and every worker with it.
    workers = [int(p) for p in Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()]
    assert workers
    assert gw.stop() == 0
    deadline = time.monotonic() + 15  # multiprocessing's resource tracker leaves a moment after its parent
    while [p for p in workers if Path(f"/proc/{p}").exists()] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()]


def test_the_fastapi_route_and_the_fast_path_answer_alike(topics, make_gateway, post, counts, api_key):
    ev = CallFactory(Fleet(seed=2), seed=2).events("chat")[0]
    big = b'{"event":"chat_started","pad":"' + b"x" * 3000 + b'"}'
    answers = {}
    for fast in ("true", "false"):
        gw = make_gateway(CALLSTREAM_WEBHOOK_FAST_PATH=fast, CALLSTREAM_MAX_BODY_BYTES="2048")
        got = []
        for body, sig in [(ev.body(), ...), (ev.body(), None), (b'{"event":"chat_ended"}', ...), (big, ...)]:
            r = post(gw, body, signature=sig)
            got.append((r.status_code, r.content, r.headers.get("content-type")))
        answers[fast] = got
    assert [s for s, _, _ in answers["true"]] == [204, 401, 422, 413]
    assert answers["true"] == answers["false"]
    assert counts()["chat_started"] == 2 and counts()["dead_letter"] == 2
