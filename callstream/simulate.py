"""`callstream simulate`: signed webhook traffic against a gateway, with the sender's real habits.

Like Retell's sender it fires each call's events in order without waiting on the previous one,
gives each delivery 10 s, retries a failed one up to 3 times, and sometimes delivers the same
event twice. Calls overlap, so events of many calls interleave, and a small share of a call's
neighbouring events are swapped (reordering on the way).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

from callstream.fakecalls import CallFactory, Event, Fleet
from kernel.signature import sign

SENDER_TIMEOUT_S = 10.0
SENDER_RETRIES = 3


@dataclass
class SimulationResult:
    sent: int = 0  # deliveries attempted (first tries and retries)
    events: int = 0  # distinct events
    statuses: Counter[int] = field(default_factory=Counter)
    duplicates: int = 0
    retries: int = 0
    failed: int = 0  # events never acknowledged after every retry
    latencies_ms: list[float] = field(default_factory=list)
    calls: set[str] = field(default_factory=set)
    chats: set[str] = field(default_factory=set)
    by_event: Counter[str] = field(default_factory=Counter)
    accepted_by_event: Counter[str] = field(default_factory=Counter)  # events answered 2xx (duplicates not counted)
    accepted: list[Event] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> str:
        by_status = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items())) or "none"
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (
            f"sent {self.sent} deliveries ({self.events} events of {len(self.calls)} calls and "
            f"{len(self.chats)} chats; {self.duplicates} duplicate deliveries, {self.retries} retries) "
            f"in {self.seconds:.1f}s ({rate:.0f}/s)\n"
            f"  by status: {by_status}; never acknowledged: {self.failed}\n"
            f"  latency p50 {self.percentile(0.5):.1f} ms, p95 {self.percentile(0.95):.1f} ms, "
            f"p99 {self.percentile(0.99):.1f} ms"
        )


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


async def run(
    url: str,
    key: str | None,
    calls: int = 200,
    rate: float = 200.0,
    duration: float | None = None,
    concurrency: int = 64,
    duplicate_rate: float = 0.03,
    reorder_rate: float = 0.02,
    seed: int = 1,
    agents: int = 5,
    progress: Callable[[int], None] | None = None,
    keep_accepted: bool = False,
    events: list[Event] | None = None,
) -> SimulationResult:
    """Send traffic to `url` at about `rate` deliveries/s; stop after `calls` calls or `duration` s."""
    rng = random.Random(seed)
    factory = CallFactory(Fleet(seed=seed, agents=agents), seed=seed)
    source: Iterator[Event] = (
        iter(events)
        if events is not None
        else schedule(factory, calls if duration is None else 10**9, reorder=reorder_rate, rng=rng)
    )
    res = SimulationResult()
    sem = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    interval = 1.0 / rate if rate > 0 else 0.0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=SENDER_TIMEOUT_S, limits=limits) as client:

        async def deliver(ev: Event, body: bytes) -> bool:
            for attempt in range(SENDER_RETRIES + 1):
                headers = {"content-type": "application/json"}
                if key:
                    headers["x-retell-signature"] = sign(body, key)
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers=headers)
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                res.latencies_ms.append((time.perf_counter() - t0) * 1000)
                res.sent += 1
                res.statuses[status] += 1
                if progress:
                    progress(1)
                if 200 <= status < 300:
                    if keep_accepted:
                        res.accepted.append(ev)
                    return True
                if status not in (0, 408, 429) and status < 500:
                    return False  # a 4xx is final: the sender does not retry a refusal
                res.retries += 1 if attempt < SENDER_RETRIES else 0
                await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
            res.failed += 1
            return False

        async def one(ev: Event) -> None:
            try:
                body = ev.body()
                if await deliver(ev, body):
                    res.accepted_by_event[ev.event] += 1
                if rng.random() < duplicate_rate:
                    res.duplicates += 1
                    await deliver(ev, body)
            finally:
                sem.release()

        tasks: set[asyncio.Task[None]] = set()
        for n, ev in enumerate(source):
            if duration is not None and time.monotonic() - started >= duration:
                break
            if interval:
                wait = started + n * interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await sem.acquire()
            res.events += 1
            res.by_event[ev.event] += 1
            (res.chats if ev.event.startswith("chat_") else res.calls).add(ev.key)
            t = asyncio.create_task(one(ev))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    res.seconds = time.monotonic() - started
    return res
