"""Property-based fuzz of bodies and headers against a real gateway process and the real broker.

Whatever arrives: no 5xx other than 503, no crash, exactly the status the contract names, exactly
one message per 204 and per dead letter, and the service answers correctly afterwards.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callstream.fakecalls import CallFactory, Fleet
from kernel.catalogue import EVENT_NAMES, EVENTS_BY_NAME, Subject
from kernel.signature import sign

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LIMIT = 4096
ints = st.integers(-(2**63), 2**64 - 1)  # what JSON encoders produce
ids = st.one_of(st.none(), st.text(max_size=20), ints, st.lists(ints, max_size=2))
refs = st.one_of(
    st.none(),
    st.text(max_size=5),
    ints,
    st.fixed_dictionaries({}, optional={"call_id": ids, "chat_id": ids, "x": st.text(max_size=30)}),
)
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
events = st.one_of(st.sampled_from(EVENT_NAMES), st.text(max_size=20), ints, st.none())
envelopes = st.fixed_dictionaries(
    {}, optional={"event": events, "call": refs, "chat": refs, "padding": st.text(max_size=6000), "extra": json_values}
)
# Mostly well-formed deliveries with odd contents, so both sides of routing are reached.
routables = st.builds(
    lambda ev, key, extra: {
        "event": ev,
        "extra": extra,
        ("chat" if ev.startswith("chat_") else "call"): {key[0]: key[1], "x": extra},
    },
    st.one_of(st.sampled_from(EVENT_NAMES), st.text(min_size=1, max_size=12)),
    st.tuples(st.sampled_from(["call_id", "chat_id"]), st.text(min_size=1, max_size=30)),
    json_values,
)
bodies = st.one_of(
    routables.map(orjson.dumps),
    envelopes.map(orjson.dumps),
    json_values.map(orjson.dumps),
    st.binary(max_size=300),
    st.just(b""),
)
# Header values without surrounding blanks: HTTP strips them, and h11 refuses to send them.
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120).map(str.strip)
# Half of the deliveries correctly signed: the rest of the contract is behind the signature.
signatures = st.one_of(
    st.just("valid"), st.sampled_from(["none", "wrong_key", "stale", "future"]), header_text, st.just("valid")
)


def routable(body: bytes) -> bool:
    """The contract's rule, written independently of gateway/routing.py."""
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str) or not doc["event"]:
        return False
    ids_: dict[str, Any] = {}
    for subject in ("call", "chat"):
        ref = doc.get(subject)
        if ref is None:
            continue
        if not isinstance(ref, dict):
            return False
        v = ref.get(f"{subject}_id")
        if v is not None and not isinstance(v, str):
            return False
        ids_[subject] = v
    et = EVENTS_BY_NAME.get(doc["event"])
    if et is None:
        return bool(ids_.get("call") or ids_.get("chat"))
    return bool(ids_.get("chat" if et.subject is Subject.CHAT else "call"))


@pytest.fixture
def fuzz_gateway(make_gateway, topics):
    return make_gateway("--log-level", "ERROR", CALLSTREAM_MAX_BODY_BYTES=str(LIMIT))


def test_fuzzed_bodies_and_headers_get_exactly_the_contracts_status(fuzz_gateway, api_key, counts, consume, topics):
    tally = {"stored": 0, "dead": 0, "sent": 0}
    client = httpx.Client(base_url=fuzz_gateway.url, timeout=15)

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        body=bodies,
        sig=signatures,
        content_type=header_text,
        forwarded=header_text,
        junk=st.dictionaries(st.from_regex(r"x-[a-z]{1,10}", fullmatch=True), header_text, max_size=3),
    )
    def one(body: bytes, sig: str, content_type: str, forwarded: str, junk: dict[str, str]) -> None:
        header = {
            "valid": sign(body, api_key),
            "none": None,
            "wrong_key": sign(body, "not_our_key"),
            "stale": sign(body, api_key, 1_600_000_000_000),
            "future": sign(body, api_key, 4_000_000_000_000),
        }.get(sig, sig)
        h = {**junk, "content-type": content_type, "x-forwarded-for": forwarded}
        if header is not None:
            h["x-retell-signature"] = header
        r = client.post("/webhook", content=body, headers=h)
        tally["sent"] += 1
        assert r.status_code < 500 or r.status_code == 503, r.text
        if len(body) > LIMIT:
            want = 413
        elif sig != "valid":
            want = 401
        else:
            want = 204 if routable(body) else 422
        assert r.status_code == want, (r.status_code, r.text, body[:200])
        if want == 204:
            tally["stored"] += 1
        elif want == 422:
            tally["dead"] += 1
            assert r.json()["error"] == "bad_payload"

    one()
    print(f"\nfuzz: {tally}")
    assert fuzz_gateway.proc.poll() is None, "the gateway died"
    # Still correct afterwards.
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    ev = CallFactory(Fleet(seed=1), seed=1).events("chat")[0]
    assert (
        client.post("/webhook", content=ev.body(), headers={"x-retell-signature": sign(ev.body(), api_key)}).status_code
        == 204
    )
    # One message per 204 and per dead letter, nothing for anything refused.
    got = counts()
    assert got["dead_letter"] == tally["dead"]
    assert sum(n for t, n in got.items() if t != "dead_letter") == tally["stored"] + 1
    assert any(m.value() == ev.body() for m in consume(f"{topics}.chat_started", expect=got["chat_started"]))
    # The fuzz reached both sides of routing. Hypothesis mixes constants from every project module
    # loaded so far into what it draws, so the split shifts with what else the session imported.
    assert tally["stored"] > 10 and tally["dead"] > 10


def test_schemathesis_cases_from_the_openapi_document(fuzz_gateway, api_key, counts):
    """Cases generated from the gateway's own /openapi.json, as sent and re-signed with our key."""
    import json

    import schemathesis

    spec = httpx.get(fuzz_gateway.url + "/openapi.json").json()
    op = schemathesis.openapi.from_dict(spec)["/webhook"]["POST"]
    documented = {int(s) for s in spec["paths"]["/webhook"]["post"]["responses"]}
    tally = {"stored": 0, "dead": 0}
    client = httpx.Client(base_url=fuzz_gateway.url, timeout=15)

    @settings(
        max_examples=250,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=op.as_strategy(), resign=st.booleans())
    def one(case: Any, resign: bool) -> None:
        body = json.dumps(case.body).encode()
        sig = sign(body, api_key) if resign else str((case.headers or {}).get("x-retell-signature", ""))
        r = client.post(
            "/webhook", content=body, headers={"content-type": "application/json", "x-retell-signature": sig.strip()}
        )
        assert r.status_code in documented, (r.status_code, r.text)
        want = 413 if len(body) > LIMIT else (204 if routable(body) else 422) if resign else 401
        assert r.status_code == want, (r.status_code, r.text, body[:200])
        if want in (204, 422):
            tally["stored" if want == 204 else "dead"] += 1

    one()
    assert fuzz_gateway.proc.poll() is None
    assert client.get("/healthz").status_code == 200
    got = counts()
    assert got["dead_letter"] == tally["dead"]
    assert sum(n for t, n in got.items() if t != "dead_letter") == tally["stored"]
    print(f"\nschemathesis: {tally}")
    # Both sides of routing reached (the split shifts with the modules loaded: see the test above).
    assert tally["stored"] > 3 and tally["dead"] > 3
