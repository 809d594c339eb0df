"""What the worker's `/readyz` says: ready, or why not."""

from __future__ import annotations


class Readiness:
    """Ready once the worker's partitions are assigned and recovered and it processes them.

    Until then the reason says what it waits for: Kafka, its topics, or the recovery of its state.
    Set from the event loop and from the topic gate's thread; each change is one assignment.
    """

    def __init__(self) -> None:
        self._reason: str | None = "starting"

    def waiting(self, what: str) -> None:
        """`what` as `kernel.topics.wait_for_topics` says it: `waiting for topics ...` or `waiting for Kafka at ...`."""
        self._reason = what

    def recovering(self) -> None:
        self._reason = "recovering"

    def ready(self) -> None:
        self._reason = None

    def failed(self, why: str) -> None:
        self._reason = f"failed: {why}"

    @property
    def is_ready(self) -> bool:
        return self._reason is None

    def describe(self) -> str:
        return "ready" if self._reason is None else f"not ready: {self._reason}"
