"""The traffic of a plan: events of overlapping calls in send order, duplicated now and then, each
made into a signed request with the time it is due, before the sender needs it.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from callstream.fakecalls import CallFactory, Event, Fleet
from callstream.sim.http1 import Target
from callstream.sim.plan import SimulationPlan
from kernel.signature import sign

# A duplicate is delivered again after this many other deliveries at most (the sender's retry racing
# a slow acknowledgement).
DUPLICATE_GAP = 8


class Delivery(NamedTuple):
    """One planned delivery, ready to write."""

    due: float  # seconds after the run's start
    event: str
    key: str
    request: bytes  # the complete HTTP request, signed when it was made
    body_at: int  # where the body starts in `request`
    signed_ms: int
    duplicate: bool

    @property
    def body(self) -> bytes:
        return self.request[self.body_at :]


def schedule(
    factory: CallFactory,
    calls: int,
    overlap: int = 20,
    reorder: float = 0.02,
    rng: random.Random | None = None,
) -> Iterator[Event]:
    """Events of `calls` calls and chats, `overlap` in progress at once, interleaved in send order."""
    rng = rng or random.Random(0)
    pending = calls
    active: list[list[Event]] = []
    while pending or active:
        while pending and len(active) < overlap:
            evs = factory.events()
            if len(evs) > 1 and rng.random() < reorder:
                i = rng.randrange(len(evs) - 1)
                evs[i], evs[i + 1] = evs[i + 1], evs[i]
            active.append(evs)
            pending -= 1
        i = rng.randrange(len(active))
        yield active[i].pop(0)
        if not active[i]:
            active.pop(i)


def with_duplicates(events: Iterable[Event], share: float, rng: random.Random) -> Iterator[tuple[Event, bool]]:
    """Each event, and for about `share` of them the same event again a few deliveries later."""
    later: list[tuple[int, int, Event]] = []  # (delivered after this position, tie-breaker, event)
    for n, ev in enumerate(events):
        while later and later[0][0] <= n:
            yield heapq.heappop(later)[2], True
        yield ev, False
        if rng.random() < share:
            heapq.heappush(later, (n + rng.randint(1, DUPLICATE_GAP), n, ev))
    while later:
        yield heapq.heappop(later)[2], True


def deliveries(plan: SimulationPlan, target: Target, key: str | None) -> Iterator[Delivery]:
    """Every delivery of `plan`, in send order; endless with a duration and no rate (the sender stops)."""
    rng = random.Random(plan.seed)
    # The agents stay the same from run to run, as a customer's fleet does; the calls are new.
    factory = CallFactory(Fleet(agents=plan.agents), seed=plan.seed)
    calls = plan.calls if plan.duration is None else 2**62
    events = schedule(factory, calls, reorder=plan.reorder_rate, rng=rng)
    last = plan.duration * plan.rate if plan.duration is not None and plan.rate > 0 else float("inf")
    for n, (ev, duplicate) in enumerate(with_duplicates(events, plan.duplicate_rate, rng)):
        if n >= last:
            return
        body = ev.body()
        now_ms = int(time.time() * 1000)
        request, body_at = target.request(body, sign(body, key, now_ms) if key else None)
        yield Delivery(n * plan.interval, ev.event, ev.key, request, body_at, now_ms, duplicate)
