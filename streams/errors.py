"""Errors of the stream processors, each naming what to fix."""

from __future__ import annotations

from kernel.errors import CallstreamError


class StreamsError(CallstreamError):
    """Base of every streams error."""


class AlertConfigError(StreamsError):
    """The alert rules file is missing, not TOML, or has an unknown key or a wrong type."""
