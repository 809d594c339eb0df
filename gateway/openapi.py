"""How POST /webhook reads in the OpenAPI document (/docs): its body, its signature, its answers."""

from __future__ import annotations

from typing import Any

from kernel.catalogue import EVENT_NAMES

_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event"],
    "properties": {
        "event": {
            "type": "string",
            "enum": [*EVENT_NAMES],
            "description": "other values go to <prefix>.unknown",
        },
        "call": {
            "type": "object",
            "required": ["call_id"],
            "properties": {"call_id": {"type": "string", "minLength": 1}},
        },
        "chat": {
            "type": "object",
            "required": ["chat_id"],
            "properties": {"chat_id": {"type": "string", "minLength": 1}},
        },
    },
    # call_* and transfer_* events carry `call`, chat_* events `chat`; the id keys the message.
    "anyOf": [{"required": ["call"]}, {"required": ["chat"]}],
}

WEBHOOK_REQUEST: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The webhook body exactly as Retell / UponAI send it; forwarded to Kafka byte for byte.",
        "content": {"application/json": {"schema": _BODY_SCHEMA}},
    },
    "parameters": [
        {
            "name": "x-retell-signature",
            "in": "header",
            "required": True,
            "description": "v=<unix ms>,d=<hex HMAC-SHA256 of body + timestamp keyed with the API key>",
            "schema": {"type": "string"},
        }
    ],
}

WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    204: {"description": "the event is durably in Kafka (acks=all)"},
    401: {"description": "missing, malformed, wrongly keyed or stale signature; nothing stored"},
    403: {"description": "source address not in CALLSTREAM_ALLOWED_SOURCES; nothing stored"},
    413: {"description": "body over the size limit; nothing stored"},
    422: {"description": "signed, but not a routable event; kept on the dead-letter topic"},
    503: {
        "description": "Kafka did not acknowledge in time, or no broker is reachable right now; retry (see Retry-After)"
    },
}
