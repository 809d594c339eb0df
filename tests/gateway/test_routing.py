"""Routing decodes only `event` and the call or chat id; everything else stays raw."""

from __future__ import annotations

import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from gateway.errors import PayloadError
from gateway.routing import route
from kernel.catalogue import EVENT_NAMES


@pytest.mark.parametrize("scenario", ["completed", "transfer_bridged", "transfer_cancelled", "failed_dial", "chat"])
def test_every_event_of_a_lifecycle_routes_to_its_topic_keyed_by_its_id(scenario: str) -> None:
    for ev in CallFactory(Fleet(seed=4), seed=4).events(scenario):
        r = route(ev.body(), "p")
        assert (r.event, r.topic, r.key, r.known) == (ev.event, f"p.{ev.event}", ev.key, True)


def test_unknown_event_goes_to_unknown_keyed_by_whichever_id_it_has() -> None:
    r = route(b'{"event":"call_recording_ready","call":{"call_id":"c1","x":[1,2]}}', "p")
    assert (r.topic, r.key, r.known) == ("p.unknown", "c1", False)
    assert route(b'{"event":"chat_paused","chat":{"chat_id":"h1"}}', "p").key == "h1"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[]", "not a webhook event"),
        (b'{"call":{"call_id":"c"}}', "not a webhook event"),
        (b'{"event":"","call":{"call_id":"c"}}', "empty"),
        (b'{"event":7,"call":{"call_id":"c"}}', "not a webhook event"),
        (b'{"event":"call_started"}', "no call.call_id"),
        (b'{"event":"call_started","call":{"call_id":""}}', "no call.call_id"),
        (b'{"event":"call_started","chat":{"chat_id":"h"}}', "no call.call_id"),
        (b'{"event":"chat_started","call":{"call_id":"c"}}', "no chat.chat_id"),
        (b'{"event":"call_started","call":"c"}', "not a webhook event"),
        (b'{"event":"call_started","call":{"call_id":5}}', "not a webhook event"),
        (b'{"event":"mystery"}', "call.call_id or chat.chat_id"),
    ],
)
def test_unroutable_bodies_say_why(body: bytes, why: str) -> None:
    with pytest.raises(PayloadError, match=why):
        route(body, "p")


def test_other_fields_are_not_decoded() -> None:
    # A huge or odd rest of the body does not matter: only the envelope is checked.
    body = orjson.dumps(
        {
            "event": EVENT_NAMES[0],
            "call": {"call_id": "c", "transcript_object": "not a list", "n": 1e300},
            "extra": [None] * 1000,
        }
    )
    assert route(body, "p").key == "c"


def test_the_other_subject_s_id_is_not_checked() -> None:
    # Found by test_fuzz: a `chat_id` of any type inside `call` is not the call's id, so it is kept.
    assert route(b'{"event":"c","call":{"call_id":"0","chat_id":0}}', "p").key == "0"
    assert route(b'{"event":"call_ended","call":{"call_id":"c","chat_id":[1]}}', "p").topic == "p.call_ended"
    assert route(b'{"event":"chat_ended","chat":{"chat_id":"h","call_id":{}}}', "p").key == "h"
