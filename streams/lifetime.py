"""How long a call's state is kept, by event time, and which states a partition's clock has made due.

A call's state exists to recognise its later deliveries (retries, reordered events). Once it can no
longer change, it is dropped: a set time after its analysis was counted, or, for a call that never
gets one, a longer time after its last delivery. Times are `received_at` (the gateway's stamp), and
a partition's clock only moves as its events are read, so a replay drops the same states and a
worker that was down for a day drops nothing before it has read what it missed.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

from streams.calls import CallState, is_done

HOUR_MS = 3600 * 1000


class Lifetime(NamedTuple):
    """How long (ms of event time) a call's state lives after its last delivery."""

    analyzed_ms: int = 6 * HOUR_MS  # once its analysis was counted
    idle_ms: int = 24 * HOUR_MS  # a call that never got one

    @property
    def shortest(self) -> int:
        """What any state outlives its last delivery by."""
        return min(self.analyzed_ms, self.idle_ms)

    @property
    def bucket_ms(self) -> int:
        """A due state is dropped within 1 % of the shortest lifetime after its due time: the index
        keeps one set of keys per bucket of due times, not one entry per call."""
        return max(1, self.shortest // 100)

    def expires_at(self, state: CallState, clock: int) -> int:
        """When the state may go; a state without `last_at` (an older version's) counts from `clock`."""
        last = state.last_at or clock
        return last + (self.analyzed_ms if is_done(state) else self.idle_ms)

    def is_late(self, received_at: int, call_at: int | None, clock: int) -> bool:
        """Whether a delivery of a call without state may belong to a call whose state was dropped.

        True when the delivery is older than the partition's clock by more than the shortest
        lifetime (a state it had would have been dropped since), or when its call's own timestamps
        are that much older than its `received_at` (a redelivery days later). A call's first
        delivery is neither: the platform sends it within minutes.
        """
        if received_at <= clock - self.shortest:
            return True
        return call_at is not None and received_at - call_at > self.shortest


class Expiry:
    """One partition's live calls by due time: set on every change, popped once the clock passes it."""

    def __init__(self, bucket_ms: int) -> None:
        self.bucket_ms = bucket_ms
        self._bucket_of: dict[bytes, int] = {}
        self._buckets: dict[int, set[bytes]] = {}
        self._heap: list[int] = []  # bucket numbers, each pushed when its set is created

    def __len__(self) -> int:
        return len(self._bucket_of)

    def __contains__(self, key: object) -> bool:
        return key in self._bucket_of

    def set(self, key: bytes, due: int) -> None:
        bucket = -(-due // self.bucket_ms)  # rounded up: a bucket is due once the clock reaches its end
        old = self._bucket_of.get(key)
        if old == bucket:
            return
        if old is not None:
            self._buckets[old].discard(key)
        self._bucket_of[key] = bucket
        keys = self._buckets.get(bucket)
        if keys is None:
            keys = self._buckets[bucket] = set()
            heapq.heappush(self._heap, bucket)
        keys.add(key)

    def discard(self, key: bytes) -> None:
        bucket = self._bucket_of.pop(key, None)
        if bucket is not None:
            self._buckets[bucket].discard(key)

    def pop_due(self, clock: int, limit: int) -> list[bytes]:
        """The keys whose due time the clock has reached, removed from the index: about `limit` at most
        (whole buckets; the rest stay due for the next call)."""
        due: list[bytes] = []
        heap, buckets = self._heap, self._buckets
        while heap and heap[0] * self.bucket_ms <= clock and len(due) < limit:
            keys = buckets.pop(heapq.heappop(heap), set())
            for key in keys:
                del self._bucket_of[key]
            due.extend(keys)
        return due
