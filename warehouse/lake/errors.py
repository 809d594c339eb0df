"""Errors of the lake."""

from kernel.errors import CallstreamError


class LakeError(CallstreamError):
    """The lake cannot be reached, created, written or read; the message says what to do."""
