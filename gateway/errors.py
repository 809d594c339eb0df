"""What can go wrong with one delivery. HTTP statuses are chosen at the route edge, not here."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of the gateway's own errors."""

    reason = "error"
    # The event type, when it was known before things went wrong (for metrics and logs).
    event: str | None = None


class SignatureError(GatewayError):
    """The delivery is not signed by a key we hold (401). Nothing is stored."""

    reason = "bad_signature"


class MissingSignature(SignatureError):
    reason = "missing_signature"


class MalformedSignature(SignatureError):
    reason = "malformed_signature"


class StaleSignature(SignatureError):
    reason = "stale_signature"


class BodyTooLarge(GatewayError):
    reason = "too_large"


class PayloadError(GatewayError):
    """Signed, but not routable: not JSON, not an object, no `event`, no call/chat id (dead letter)."""

    reason = "bad_payload"


class PublishError(GatewayError):
    """Kafka did not acknowledge the message (503, the sender retries)."""

    reason = "publish_failed"


class PublishTimeout(PublishError):
    reason = "publish_timeout"


class SourceNotAllowed(GatewayError):
    reason = "source_not_allowed"
