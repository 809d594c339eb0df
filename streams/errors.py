"""Errors of the stream processors, each naming what to fix."""

from __future__ import annotations

from kernel.errors import CallstreamError


class StreamsError(CallstreamError):
    """Base of every streams error."""


class AlertConfigError(StreamsError):
    """The alert rules file is missing, not TOML, or has an unknown key or a wrong type."""


class PartitionMismatch(StreamsError):
    """The event topics (or the state table's changelog) do not all have the same partition count."""


class StateUnreadable(StreamsError):
    """The state table's changelog holds a record the worker cannot decode."""


class WorkerStopped(StreamsError):
    """The worker stopped after an error it did not expect (the log above says which)."""


class ReadSideError(StreamsError):
    """The dashboard, `/api/*` and `/metrics` would be open to anyone who reaches the port."""
