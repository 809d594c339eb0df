"""What can go wrong with one delivery. HTTP statuses are chosen at the route edge, not here."""

from __future__ import annotations

from kernel.errors import CallstreamError


class GatewayError(CallstreamError):
    """Base of the gateway's own errors."""

    reason = "error"
    # The event type, when it was known before things went wrong (for metrics and logs).
    event: str | None = None


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
