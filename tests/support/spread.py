"""The simulator's traffic spread over several gateways, with every acknowledged event on record.

The deliveries are `callstream simulate`'s own (`callstream.sim.traffic.deliveries`: the realistic
mix of overlapping calls, duplicates, reordering, signed), paced at the plan's rate and sent with
its lean HTTP client and the sender's habits (10 s per attempt, 3 retries with back-off). What the
simulator cannot do, this adds, as a load balancer in front of several gateways would: each
delivery goes to the next gateway in turn that its health check (`/healthz` every 0.5 s) finds up;
a retry goes to another one; a gateway that fails to answer is left out until it answers again.

It records what the audit needs: the digest of every body answered 2xx, and the
time, gateway and status of every attempt, so that a test can say when 503s came and how many.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from callstream.sim.http1 import Pool, Target
from callstream.sim.plan import SimulationPlan
from callstream.sim.sender import SENDER_RETRIES, SENDER_TIMEOUT_S
from callstream.sim.traffic import Delivery, deliveries
from kernel.catalogue import Subject, subject_of
from tests.support.expected import digest_of

HEALTH_EVERY_S = 0.5


def _retryable(status: int) -> bool:
    return not 200 <= status < 300 and (status in (0, 408, 429) or status >= 500)


@dataclass
class Attempt:
    at: float  # seconds after the start, when the answer came
    gateway: int
    status: int  # 0: no answer (refused, reset, timed out)
    seconds: float  # how long the answer took


@dataclass
class Tally:
    """What the traffic did."""

    accepted: set[int] = field(default_factory=set)  # digests of the bodies answered 2xx (expected.digest_of)
    attempts: list[Attempt] = field(default_factory=list)
    events: int = 0  # distinct planned events started
    duplicates: int = 0
    failed: int = 0  # planned deliveries never answered 2xx
    unsent: int = 0  # planned deliveries not started when the time was up (the gateways fell behind)
    calls: set[str] = field(default_factory=set)
    chats: set[str] = field(default_factory=set)
    seconds: float = 0.0
    lag_max_s: float = 0.0  # how late the latest delivery started against its plan

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.attempts)

    def of_status(self, status: int) -> list[Attempt]:
        return [a for a in self.attempts if a.status == status]

    def per_second(self, every: float = 5.0) -> str:
        """Attempts per second in each `every`-second stretch, and their non-2xx."""
        buckets: dict[int, list[Attempt]] = {}
        for a in self.attempts:
            buckets.setdefault(int(a.at // every), []).append(a)
        parts = []
        for b, attempts in sorted(buckets.items()):
            bad = sum(1 for a in attempts if not 200 <= a.status < 300)
            p50 = sorted(a.seconds for a in attempts)[len(attempts) // 2]
            parts.append(
                f"{b * every:.0f}s {len(attempts) / every:.0f}/s p50 {p50 * 1000:.0f} ms"
                + (f" ({bad} not 2xx)" if bad else "")
            )
        return ", ".join(parts)

    def summary(self) -> str:
        codes = ", ".join(f"{s or 'no answer'}: {n}" for s, n in sorted(self.statuses().items()))
        return (
            f"{self.events} events ({len(self.calls)} calls, {len(self.chats)} chats) and {self.duplicates} "
            f"duplicates in {self.seconds:.0f}s; attempts {codes}; {len(self.accepted)} distinct accepted, "
            f"{self.failed} never acknowledged, {self.unsent} not sent in time (behind the plan by up to "
            f"{self.lag_max_s:.1f}s)\n"
            f"  attempts: {self.per_second()}"
        )


class Spread:
    """`start()` the traffic in a thread of its own; `join()` returns the tally."""

    def __init__(
        self, urls: list[str], key: str, rate: float, seconds: float, seed: int, concurrency: int = 256
    ) -> None:
        self.urls = urls
        self.key = key
        self.plan = SimulationPlan(rate=rate, duration=seconds, seed=seed, concurrency=concurrency)
        self.tally = Tally()
        self.up = [True] * len(urls)
        self._next = 0
        self._start = 0.0
        self._thread = threading.Thread(target=self._run, name="spread", daemon=True)
        self._error: BaseException | None = None
        self.started = threading.Event()

    def start(self) -> Spread:
        self._thread.start()
        self.started.wait(30)
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self._start if self._start else 0.0

    def join(self) -> Tally:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.tally

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self.started.set()

    async def _main(self) -> None:
        pools = [Pool(Target.from_url(f"{u}/webhook"), SENDER_TIMEOUT_S) for u in self.urls]
        health = asyncio.create_task(self._health())
        slots = asyncio.Semaphore(self.plan.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        self._start = time.monotonic()
        self.started.set()
        deadline = self._start + (self.plan.duration or 0.0)
        try:
            for d_index, d in enumerate(deliveries(self.plan, pools[0].target, self.key)):
                wait = self._start + d.due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await slots.acquire()
                if time.monotonic() >= deadline:  # behind the plan: what is left is not sent
                    slots.release()
                    self.tally.unsent = int(self.plan.rate * (self.plan.duration or 0.0)) - d_index
                    break
                self.tally.lag_max_s = max(self.tally.lag_max_s, time.monotonic() - self._start - d.due)
                task = asyncio.create_task(self._deliver(pools, d, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            health.cancel()
            for pool in pools:
                pool.close()
        self.tally.seconds = time.monotonic() - self._start

    def _pick(self, avoid: int | None = None) -> int:
        """The next gateway in turn that is up (and not `avoid`, when another is up)."""
        n = len(self.urls)
        for step in range(n):
            i = (self._next + step) % n
            if self.up[i] and (i != avoid or n == 1):
                self._next = i + 1
                return i
        self._next += 1
        return self._next % n

    async def _deliver(self, pools: list[Pool], d: Delivery, slots: asyncio.Semaphore) -> None:
        t = self.tally
        if d.duplicate:
            t.duplicates += 1
        else:
            t.events += 1
            (t.chats if subject_of(d.event) is Subject.CHAT else t.calls).add(d.key)
        gateway, status = None, 0
        try:
            for attempt in range(1 + SENDER_RETRIES):
                if attempt:
                    await asyncio.sleep(min(2.0, 0.2 * 2.0**attempt))
                gateway = self._pick(avoid=gateway)
                answer = await pools[gateway].post(d.request)
                status = answer.status
                t.attempts.append(Attempt(time.monotonic() - self._start, gateway, status, answer.seconds or 0.0))
                if status == 0:
                    self.up[gateway] = False
                if not _retryable(status):
                    break
        finally:
            slots.release()
        if 200 <= status < 300:
            t.accepted.add(digest_of(d.body))
        else:
            t.failed += 1

    async def _health(self) -> None:
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                for i, url in enumerate(self.urls):
                    try:
                        self.up[i] = (await client.get(f"{url}/healthz")).status_code == 200
                    except httpx.HTTPError:
                        self.up[i] = False
                await asyncio.sleep(HEALTH_EVERY_S)
