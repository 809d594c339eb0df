"""The Faust app: one agent over every event topic, the call/metrics table, alerts and the dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any, cast

import faust

from kernel.catalogue import ALERTS, EVENT_NAMES, UNKNOWN, Header, topic
from streams.alertrules import RATE_RULE, load_config
from streams.alerts import AlertFeed, WebhookSender, encode_alert, failure_rate_alerts
from streams.groupview import GroupView
from streams.metrics import WINDOW_MS
from streams.processor import Alert, In, Processor
from streams.settings import WorkerSettings
from streams.transport import App
from streams.web import register_pages

log = logging.getLogger(__name__)

TABLE = "callstream_state"


class TableStore:
    """The processor's Store over a Faust table whose keys and values are raw bytes.

    Writes name their changelog partition explicitly: the partition of the events that caused
    them, which is also the partition of the key's call (see streams.processor).
    """

    def __init__(self, app: faust.App, table: Any) -> None:
        self.app = app
        self.table = table
        self.data = table.data
        self.pending: list[tuple[int, bytes, bytes | None]] = []
        self.crashing: asyncio.Future[None] | None = None

    def get(self, key: bytes) -> bytes | None:
        return self.table.data.get(key)

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        data = self.table.data
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
        key_partition = getattr(data, "_key_partition", None)
        if key_partition is not None:  # the memory store forgets revoked partitions' keys by this map
            key_partition[key] = partition
        self.pending.append((partition, key, value))

    async def flush(self) -> None:
        """Hand the batch's writes to the Kafka producer, in order, before the batch is acked.

        They go straight to the producer, not through Faust's `Topic.send` (a future, a pending
        message and a callback per write, a tenth of the worker's CPU): the producer flush that
        precedes every offset commit still covers them, and the memory store keeps no persisted
        offsets for the callback to record.
        """
        send, name, pending = self.app.producer.send, self.table.changelog_topic.get_topic_name(), self.pending
        self.pending = []
        for partition, key, value in pending:
            fut = cast(asyncio.Future[Any], await send(name, key, value, partition, None, None))
            fut.add_done_callback(self._sent)

    def _sent(self, fut: Any) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            # The offsets of the batch must not be committed over a lost state write: stop.
            log.error("changelog write failed, stopping the worker: %s", exc)
            self.crashing = asyncio.ensure_future(self.app.crash(exc))

    def keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]:
        return (k for k in list(self.table.data.keys()) if k.startswith(prefix))


def _event_and_time(message: Any) -> tuple[str, int]:
    """The event name (the gateway's `event` header, else the topic's suffix) and `received_at` ms."""
    name, at = "", 0
    for k, v in message.headers or ():
        if k == Header.EVENT:
            name = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        elif k == Header.RECEIVED_AT:
            with contextlib.suppress(TypeError, ValueError):
                at = int(v)
    if not name:
        name = message.topic.rpartition(".")[2]
    if not at:
        ts = message.timestamp
        at = int(ts * 1000) if ts else int(time.time() * 1000)
    return name, at


def create_app(settings: WorkerSettings | None = None) -> faust.App:
    cfg = settings or WorkerSettings()
    rules = load_config(cfg.alerts_config)
    app = App(
        f"{cfg.app_id}-{cfg.topic_prefix}",
        broker=f"kafka://{cfg.kafka_bootstrap}",
        store="memory://",
        topic_partitions=cfg.topic_partitions,
        value_serializer="raw",
        key_serializer="raw",
        web_host=cfg.web_host,
        web_port=cfg.web_port,
        canonical_url=cfg.web_url or f"http://{cfg.web_host}:{cfg.web_port}",
        datadir=cfg.data_dir,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=cfg.batch_size * 4,
        # On a rebalance Faust must wait for the batch the agent holds before it recovers the
        # table: recovery replays the changelog into the same in-memory table, and a batch
        # processed during the replay has its writes overwritten by older values while its
        # offsets are still committed, so its events are lost from the live totals.
        stream_wait_empty=True,
        broker_commit_every=cfg.batch_size * 4,
        web_router_enabled=True,
        # Every batch writes its calls' states to the changelog: let the producer batch them.
        producer_linger_ms=10,
        producer_max_batch_size=1_048_576,
        producer_max_request_size=4_194_304,
        # Event bodies run to 30 KB: aiokafka's default 1 MB per partition and fetch would hand
        # the stream a few dozen call_analyzed at a time.
        consumer_max_fetch_size=8 * 1_048_576,
        broker_max_poll_records=cfg.batch_size * 2,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=max(1.0, cfg.session_timeout_s / 4),
    )
    names = [topic(cfg.topic_prefix, e) for e in (*EVENT_NAMES, UNKNOWN)]
    source = app.topic(*names, value_type=bytes, key_type=bytes)
    alerts_topic = app.topic(topic(cfg.topic_prefix, ALERTS), value_type=bytes, key_type=bytes)
    table = app.Table(TABLE, default=None, key_type=bytes, value_type=bytes, partitions=cfg.topic_partitions)
    sender = WebhookSender(cfg.alert_webhook_url.get_secret_value() if cfg.alert_webhook_url else None)
    feed = AlertFeed(cfg.kafka_bootstrap, topic(cfg.topic_prefix, ALERTS))

    def publish(alert: Alert) -> None:
        log.info("alert %s", alert.text)
        alerts_topic.send_soon(key=alert.id.encode(), value=encode_alert(alert))
        sender.submit(alert)

    store = TableStore(app, table)
    processor = Processor(store, rules, publish)
    state = {"ready": False}

    def active() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == names[0]}

    def peers() -> list[str]:
        try:
            return [str(u) for u in app.router.table_metadata(TABLE)]
        except (KeyError, AttributeError):
            return []

    view = GroupView(
        processor, cfg.topic_partitions, str(app.conf.canonical_url), active, peers, lambda: state["ready"]
    )

    @app.agent(source)
    async def process(stream: Any) -> None:
        async for events in stream.take_events(cfg.batch_size, within=cfg.batch_within_s):
            batch = []
            for ev in events:
                m = ev.message
                name, at = _event_and_time(m)
                key = m.key if isinstance(m.key, bytes) else str(m.key or "").encode()
                batch.append(In(m.partition, name, key, m.value or b"", at))
            processor.process(batch)
            await store.flush()

    async def _moving(sender: Any, *args: Any, **kwargs: Any) -> None:
        state["ready"] = False

    async def _recovered(sender: Any, *args: Any, **kwargs: Any) -> None:
        processor.reset()  # reload the books from the recovered table
        state["ready"] = True

    app.on_partitions_revoked.connect(_moving)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(_moving)  # type: ignore[arg-type]
    app.on_rebalance_complete.connect(_recovered)  # type: ignore[arg-type]

    @app.task
    async def _start_alerts() -> None:
        # A batch sends one changelog write per call it touched; Faust's default (100 pending
        # messages) would stall the stream on every batch until the producer caught up.
        app.producer.buffer.max_messages = cfg.batch_size * 4
        feed.start()
        await sender.run()

    last_rate_alert: dict[str, int] = {}

    @app.timer(rules.failure_rate.check_seconds, on_leader=True)
    async def _failure_rate() -> None:
        rule = rules.failure_rate
        if not rule.enabled or not state["ready"]:
            return
        # Throttling survives a restart or a new leader: the feed holds the alerts raised before.
        for agent, at in feed.last_by_rule_agent(RATE_RULE).items():
            last_rate_alert[agent] = max(last_rate_alert.get(agent, 0), at)
        now = int(time.time() * 1000)
        books, _ = await view.books(since=now - now % WINDOW_MS - rule.window_minutes * WINDOW_MS)
        for alert in failure_rate_alerts(rule, view.windows(books), now, last_rate_alert):
            log.info("alert %s", alert.text)
            await alerts_topic.send(key=alert.agent_id.encode(), value=encode_alert(alert))
            sender.submit(alert)

    register_pages(app, view, feed, sender, processor)
    app.callstream = {
        "processor": processor,
        "store": store,
        "agent": process,
        "view": view,
        "feed": feed,
        "sender": sender,
    }  # type: ignore[attr-defined]
    return app
