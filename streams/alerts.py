"""Alert delivery: the sender to the alert routes (off the stream's path), the alerts feed and the failure-rate rule.

Per-call rules are decided in `streams.calls` (once per (rule, call), remembered in the call's
state). This module delivers what they raise, tails `<prefix>.alerts` for the dashboard, and
evaluates the per-agent failure-rate rule over the group-wide windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping

import httpx
import msgspec
from confluent_kafka import Consumer, KafkaException, TopicPartition

from streams.alertroutes import Route, Routing
from streams.alertrules import RATE_RULE, FailureRateRule
from streams.metrics import ALL, WINDOW_MS, Agg
from streams.processor import Alert

log = logging.getLogger(__name__)

encode_alert = msgspec.json.Encoder().encode
decode_alert = msgspec.json.Decoder(Alert).decode


class WebhookSender:
    """POSTs each alert to its rule's routes (`streams.alertroutes`) with retries and backoff, from its own tasks.

    `submit` never blocks and never raises: the stream hands an alert over and moves on. An alert
    is queued at most once per route (a repeated submit of the same id is ignored). When an endpoint
    is down longer than the queue lasts, the oldest waiting deliveries are dropped (logged); the
    alerts stay on the alerts topic either way.
    """

    def __init__(
        self,
        routing: Routing,
        *,
        attempts: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 5.0,
        queue_size: int = 10_000,
        senders: int = 4,
    ) -> None:
        self.routing = routing
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.senders = senders
        self._queue: deque[tuple[Route, Alert]] = deque(maxlen=queue_size)
        self._queued: OrderedDict[tuple[str, str], None] = OrderedDict()  # (route, alert id) lately queued
        self._wake = asyncio.Event()
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (route, "sent" | "failed" | "dropped")
        self._open: dict[str, int] = {}  # alert id -> its routes not yet done with it
        # Called with each alert once every route is done with it (sent, refused, given up, dropped).
        self.on_done: Callable[[Alert], None] | None = None

    @property
    def sent(self) -> int:
        return self._total("sent")

    @property
    def failed(self) -> int:
        return self._total("failed")

    @property
    def dropped(self) -> int:
        return self._total("dropped")

    def _total(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.outcomes.items() if o == outcome)

    def posts(self, alert: Alert) -> bool:
        """Whether any route takes this alert (the outbox waits for `on_done` only then)."""
        return bool(self.routing.routes(alert))

    def submit(self, alert: Alert) -> None:
        fresh = [route for route in self.routing.routes(alert) if (route.name, alert.id) not in self._queued]
        if not fresh:  # every route has it queued or done already
            if alert.id not in self._open:
                self._done(alert)
            return
        self._open[alert.id] = self._open.get(alert.id, 0) + len(fresh)
        for route in fresh:
            self._queued[(route.name, alert.id)] = None
            if len(self._queued) > (self._queue.maxlen or 0):
                self._queued.popitem(last=False)
            if len(self._queue) == self._queue.maxlen:
                dropped, oldest = self._queue.popleft()
                self.outcomes[(dropped.name, "dropped")] += 1
                log.warning(
                    "alert route %s is behind: dropped the oldest queued alert to keep %s", route.name, alert.id
                )
                self._route_done(oldest)
            self._queue.append((route, alert))
        self._wake.set()

    def _route_done(self, alert: Alert) -> None:
        left = self._open.get(alert.id, 1) - 1
        if left > 0:
            self._open[alert.id] = left
            return
        self._open.pop(alert.id, None)
        self._done(alert)

    def _done(self, alert: Alert) -> None:
        if self.on_done is not None:
            self.on_done(alert)

    async def run(self) -> None:
        if not self.routing.active:
            return
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            await asyncio.gather(*(self._sender(client) for _ in range(self.senders)))

    async def _sender(self, client: httpx.AsyncClient) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            route, alert = self._queue.popleft()
            try:
                await self._deliver(client, route, alert)
            finally:
                self._route_done(alert)

    async def _deliver(self, client: httpx.AsyncClient, route: Route, alert: Alert) -> None:
        body = self.routing.body(route, alert)
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                # The alert id lets a receiver that keeps them drop the one repost a crash can cause.
                r = await client.post(route.url, json=body, headers={"Idempotency-Key": alert.id})
                if r.status_code < 300:
                    self.outcomes[(route.name, "sent")] += 1
                    return
                if r.status_code < 500 and r.status_code != 429:
                    log.error(
                        "alert route %s refused %s with HTTP %d; not retrying", route.name, alert.id, r.status_code
                    )
                    self.outcomes[(route.name, "failed")] += 1
                    return
                problem = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < self.attempts:
                log.warning(
                    "alert route %s: %s for %s (attempt %d/%d); retrying in %.1fs",
                    route.name,
                    problem,
                    alert.id,
                    attempt,
                    self.attempts,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        self.outcomes[(route.name, "failed")] += 1
        log.error("alert route %s: gave up on %s after %d attempts", route.name, alert.id, self.attempts)


class AlertFeed:
    """The latest alerts of the whole group, read from every partition of `<prefix>.alerts`.

    A plain consumer without a group, in a thread, so every worker shows every alert, and a
    restarted worker still shows the ones raised before.
    """

    def __init__(self, bootstrap: str, topic: str, keep: int = 200) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.keep = keep
        self._recent: deque[Alert] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-feed", daemon=True)
        self.loaded = threading.Event()  # the backlog was read once

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def recent(self, n: int = 50) -> list[Alert]:
        with self._lock:
            items = list(self._recent)
        items.sort(key=lambda a: a.at)
        return items[-n:][::-1]

    def last_by_rule_agent(self, rule: str) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for a in self._recent:
                if a.rule == rule:
                    out[a.agent_id] = max(out.get(a.agent_id, 0), a.at)
            return out

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"alert-feed-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            partitions = self._wait_for_topic(consumer)
            if partitions is not None:
                consumer.assign(self._backlog_start(consumer, partitions))
                self._tail(consumer)
        except Exception:
            log.exception("alert feed stopped")
        finally:
            with contextlib.suppress(Exception):
                consumer.close()

    def _wait_for_topic(self, consumer: Consumer) -> list[int] | None:
        """The topic's partitions once Kafka shows it; None when stopped first."""
        while not self._stop.is_set():
            try:
                meta = consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
                if meta is not None and meta.error is None and meta.partitions:
                    return list(meta.partitions)
            except KafkaException as exc:
                log.warning("alert feed: %s not readable yet: %s", self.topic, exc)
            time.sleep(1.0)
        return None

    def _backlog_start(self, consumer: Consumer, partitions: list[int]) -> list[TopicPartition]:
        """Each partition from its last `keep` alerts."""
        out = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
            out.append(TopicPartition(self.topic, p, max(low, high - self.keep)))
        return out

    def _tail(self, consumer: Consumer) -> None:
        while not self._stop.is_set():
            messages = consumer.consume(num_messages=500, timeout=0.5)
            if not messages:
                self.loaded.set()  # the backlog is read
            for message in messages:
                value = message.value()
                if message.error() is not None or value is None:
                    continue
                try:
                    alert = decode_alert(value)
                except msgspec.DecodeError:
                    continue
                with self._lock:
                    self._recent.append(alert)


def failure_rate_alerts(
    rule: FailureRateRule, windows: Mapping[int, Mapping[str, Agg]], now_ms: int, last_raised: dict[str, int]
) -> list[Alert]:
    """Per agent: failed / finished calls over the last `window_minutes` whole and current minutes.

    `last_raised` (agent -> unix ms) throttles: an agent alerts again only `throttle_minutes` later;
    it is updated in place.
    """
    since = now_ms - now_ms % WINDOW_MS - (rule.window_minutes - 1) * WINDOW_MS
    failed: dict[str, int] = {}
    finished: dict[str, int] = {}
    for start, scopes in windows.items():
        if start < since:
            continue
        for agent, agg in scopes.items():
            if agent == ALL:
                continue
            failed[agent] = failed.get(agent, 0) + agg.counts.get("failed", 0)
            finished[agent] = finished.get(agent, 0) + agg.counts.get("calls_finished", 0)
    out: list[Alert] = []
    for agent, n in sorted(finished.items()):
        if n < rule.min_calls:
            continue
        rate = failed.get(agent, 0) / n
        if rate <= rule.threshold:
            continue
        last = last_raised.get(agent)
        if last is not None and now_ms - last < rule.throttle_minutes * 60_000:
            continue
        last_raised[agent] = now_ms
        text = (
            f":chart_with_downwards_trend: [{RATE_RULE}] agent {agent}: {failed.get(agent, 0)} of {n} calls "
            f"failed in the last {rule.window_minutes} min ({rate:.0%} > {rule.threshold:.0%})"
        )
        out.append(
            Alert(
                id=f"{RATE_RULE}:{agent}:{now_ms}",
                rule=RATE_RULE,
                agent_id=agent,
                text=text,
                at=now_ms,
                value=round(rate, 4),
            )
        )
    return out
