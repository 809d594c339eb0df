"""Decode only what routing needs (`event` and the call or chat id); the raw bytes are forwarded."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from gateway.errors import PayloadError
from kernel.catalogue import EVENTS_BY_NAME, Subject, event_topic


# One struct per subject: `call.chat_id` (or `chat.call_id`) is not ours to check, whatever its type.
class _CallRef(msgspec.Struct):
    call_id: str | None = None


class _ChatRef(msgspec.Struct):
    chat_id: str | None = None


class _Envelope(msgspec.Struct):
    event: str
    call: _CallRef | None = None
    chat: _ChatRef | None = None


_decoder = msgspec.json.Decoder(_Envelope)


@dataclass(frozen=True, slots=True)
class Route:
    event: str
    topic: str
    key: str
    known: bool


def route(body: bytes, prefix: str) -> Route:
    """Where a body goes: its topic and key. Raises `PayloadError` for a body that cannot be routed."""
    try:
        env = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"body is not a webhook event: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise PayloadError(f"body is not valid JSON: {exc}") from exc
    if not env.event:
        raise PayloadError("`event` is empty")
    et = EVENTS_BY_NAME.get(env.event)
    if et is None:
        # Unknown types are kept (on <prefix>.unknown); they still need an id to be keyed.
        key = (env.call.call_id if env.call else None) or (env.chat.chat_id if env.chat else None)
        field = "call.call_id or chat.chat_id"
    elif et.subject is Subject.CHAT:
        key = env.chat.chat_id if env.chat else None
        field = "chat.chat_id"
    else:
        key = env.call.call_id if env.call else None
        field = "call.call_id"
    if not key:
        raise PayloadError(f"event {env.event!r} has no {field}")
    return Route(event=env.event, topic=event_topic(prefix, env.event), key=key, known=et is not None)
