"""Errors of the shared tooling (local Kafka, topics, simulator)."""


class CallstreamError(Exception):
    """Base of every error callstream's own tooling raises on purpose."""


class KafkaSetupError(CallstreamError):
    """The local broker could not be fetched, formatted, started or reached."""
