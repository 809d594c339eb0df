"""Errors of the warehouse sink."""

from kernel.errors import CallstreamError


class WarehouseError(CallstreamError):
    """Base of the sink's own errors."""


class RecordError(WarehouseError):
    """One Kafka record cannot be loaded (it goes to the dead-letter topic with this message)."""
