"""What can go wrong with one delivery, named by what went wrong. The HTTP status of each is chosen
at the route edge (`gateway.webhook`), not here."""

from __future__ import annotations

from kernel.errors import CallstreamError


class GatewayError(CallstreamError):
    """Base of the gateway's own errors; `reason` is the short name in metrics and error bodies."""

    reason = "error"
    # The event type, when it was known before things went wrong (for metrics and logs).
    event: str | None = None


class BodyTooLarge(GatewayError):
    """The body is over the configured size limit."""

    reason = "too_large"


class PayloadError(GatewayError):
    """Signed, but not routable: not JSON, not an object, no `event`, no call/chat id."""

    reason = "bad_payload"


class PublishError(GatewayError):
    """Kafka did not acknowledge the message, so it may not be stored; the sender should retry."""

    reason = "publish_failed"


class PublishTimeout(PublishError):
    """Kafka did not acknowledge the message within the publish deadline."""

    reason = "publish_timeout"


class KafkaUnavailable(PublishError):
    """Refused without trying: no broker is reachable, or the producer is being replaced."""

    reason = "kafka_unavailable"


class SourceNotAllowed(GatewayError):
    """The sender's address is not in the source allowlist."""

    reason = "source_not_allowed"
