"""Alert delivery: the webhook sender (off the stream's path), the alerts feed and the failure-rate rule.

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
from collections import deque
from collections.abc import Callable, Mapping

import httpx
import msgspec
from confluent_kafka import Consumer, KafkaException, TopicPartition

from streams.alertrules import RATE_RULE, FailureRateRule
from streams.metrics import ALL, WINDOW_MS, Agg
from streams.processor import Alert

log = logging.getLogger(__name__)

encode_alert = msgspec.json.Encoder().encode
decode_alert = msgspec.json.Decoder(Alert).decode


class WebhookSender:
    """POSTs alerts as Slack-compatible JSON with retries and backoff, from its own tasks.

    `submit` never blocks and never raises: the stream hands an alert over and moves on. When the
    endpoint is down longer than the queue lasts, the oldest waiting alerts are dropped (logged);
    they stay on the alerts topic either way.
    """

    def __init__(
        self,
        url: str | None,
        *,
        attempts: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 5.0,
        queue_size: int = 10_000,
        senders: int = 4,
    ) -> None:
        self.url = url
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.senders = senders
        self._queue: deque[Alert] = deque(maxlen=queue_size)
        self._wake = asyncio.Event()
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        # Called with each alert once the sender is done with it (sent, refused, given up, dropped).
        self.on_done: Callable[[Alert], None] | None = None

    def submit(self, alert: Alert) -> None:
        if not self.url:
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            log.warning("alert webhook is behind: dropped the oldest queued alert to keep %s", alert.id)
            self._done(self._queue[0])
        self._queue.append(alert)
        self._wake.set()

    async def run(self) -> None:
        if not self.url:
            return
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            await asyncio.gather(*(self._sender(client) for _ in range(self.senders)))

    async def _sender(self, client: httpx.AsyncClient) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            alert = self._queue.popleft()
            await self._deliver(client, alert)
            self._done(alert)

    def _done(self, alert: Alert) -> None:
        if self.on_done is not None:
            self.on_done(alert)

    async def _deliver(self, client: httpx.AsyncClient, alert: Alert) -> None:
        assert self.url
        body = {"text": alert.text, "alert": msgspec.to_builtins(alert)}
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                # The alert id lets a receiver that keeps them drop the one repost a crash can cause.
                r = await client.post(self.url, json=body, headers={"Idempotency-Key": alert.id})
                if r.status_code < 300:
                    self.sent += 1
                    return
                if r.status_code < 500 and r.status_code != 429:
                    log.error("alert webhook refused %s with HTTP %d; not retrying", alert.id, r.status_code)
                    self.failed += 1
                    return
                problem = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < self.attempts:
                log.warning(
                    "alert webhook: %s for %s (attempt %d/%d); retrying in %.1fs",
                    problem,
                    alert.id,
                    attempt,
                    self.attempts,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        self.failed += 1
        log.error("alert webhook: gave up on %s after %d attempts", alert.id, self.attempts)


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
