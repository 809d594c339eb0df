"""The stream worker: one object that builds the Faust app and owns everything that runs in it."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any

import faust
import mode.loop
from faust.types import TP

from kernel.catalogue import UNKNOWN, Header
from kernel.lag import GroupLag, Partition
from streams.alertroutes import routing
from streams.alertrules import RATE_RULE, load_config
from streams.alerts import AlertFeed, WebhookSender, encode_alert, failure_rate_alerts
from streams.errors import StateUnreadable, StreamsError, WorkerStopped
from streams.faust_internals import App, FaustWorker, Records, set_partitions, set_producer_buffer, set_replication
from streams.groupview import GroupView
from streams.lifetime import Lifetime
from streams.memory import release_free_memory
from streams.metrics import WINDOW_MS
from streams.outbox import Outbox, ids_on_topic
from streams.processor import Alert, EventMessage, Processor
from streams.readauth import SHORT_TOKEN, ReadAccess, check_bind
from streams.readiness import Readiness
from streams.settings import WorkerSettings
from streams.table_store import TableStore
from streams.topics import TABLE, WorkerTopics, await_partitions
from streams.web import Pages, register_pages

log = logging.getLogger(__name__)


def use_uvloop() -> None:
    """Run the worker on uvloop (cheaper callbacks, futures and sockets than asyncio's own loop).

    Call it before the Worker is built: mode and Faust take the loop the policy gives then.
    """
    mode.loop.use("uvloop")


class Worker:
    """The Faust app with the processor, its state store, the group view, the alert feed and sender.

    Start-up, in order: the web server (health and readiness answer from the first moment); the
    topic gate, which creates missing topics, waits until Kafka shows them and adopts their
    partition count; then Faust's producer, consumer and table recovery. The worker is ready once
    the books of its partitions are loaded. A failure on the way stops it, and `run` raises it.
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        tokens = settings.dashboard_token_list()
        check_bind(settings.web_host, tokens, settings.dashboard_public)
        if any(len(t) < SHORT_TOKEN for t in tokens):
            log.warning("a dashboard token is shorter than %d characters: use long random ones", SHORT_TOKEN)
        self.rules = load_config(settings.alerts_config)
        self.readiness = Readiness()
        self.failure: StreamsError | None = None
        self.app = _new_app(settings)
        self.table = self.app.Table(
            TABLE, default=None, key_type=bytes, value_type=bytes, partitions=settings.topic_partitions
        )
        self.topics = WorkerTopics(settings.topic_prefix, self.table.changelog_topic.get_topic_name())
        self.store = TableStore(self.app, self.table)
        self.sender = WebhookSender(routing(self.rules, settings))
        self.feed = AlertFeed(settings.kafka_bootstrap, self.topics.alerts)
        self.alerts_topic = self.app.topic(self.topics.alerts, value_type=bytes, key_type=bytes)
        self.processor = Processor(
            self.store,
            self.rules,
            _raised,
            lifetime=Lifetime(int(settings.call_ttl_analyzed_s * 1000), int(settings.call_ttl_idle_s * 1000)),
            sources=self.topics.sources,
            horizon=self._horizon,
        )
        # Per event topic partition: its end offset, and the latest `received_at` read before it was asked.
        self._ends: dict[TP, tuple[int, int]] = {}
        # Held while the state changes and its writes go to the producer: a batch, or a tick of the clocks.
        self.state_lock = asyncio.Lock()
        self.outbox = Outbox(self.store, self._publish, self.sender, self._published_since)
        url = str(self.app.conf.canonical_url)
        self.view = GroupView(
            self.processor, settings.topic_partitions, url, self.active_partitions, self._peers, self._is_ready, tokens
        )
        self.group_lag = GroupLag(settings.kafka_bootstrap, self.app.conf.id)
        self.app.take_batches(
            self.app.topic(*self.topics.sources, value_type=bytes, key_type=bytes), self.process_records
        )
        self._last_rate_alert: dict[str, int] = {}
        self._faust_worker: FaustWorker | None = None
        self._frozen = False
        self.app.gate_start(self._await_topics, self._gate_failed)
        self._connect()
        pages = Pages(
            self.view,
            self.feed,
            self.sender,
            self.processor,
            self.readiness,
            ReadAccess(tokens),
            self.consumer_lag,
            state=self.state,
        )
        register_pages(self.app, pages)

    # -- running ---------------------------------------------------------------------------------

    def run(self, loglevel: str = "INFO") -> None:
        """Run until stopped by a signal; raise what stopped it otherwise."""
        Path(self.settings.data_dir).mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
        self._faust_worker = FaustWorker(self.app, loglevel)
        status = self._faust_worker.run()
        if self.failure is not None:
            raise self.failure
        if status != 0:
            raise WorkerStopped(f"the worker stopped after an error (exit status {status}); the log above says which")

    def fail(self, error: StreamsError) -> None:
        """Stop the worker because of `error`, which `run` raises once Faust has shut down."""
        if self.failure is not None:
            return
        self.failure = error
        self.readiness.failed(str(error))
        log.error("%s", error)
        if self._faust_worker is not None:
            self._faust_worker.stop_soon()

    def _connect(self) -> None:
        """The rebalance handlers, the background task and the failure-rate timer."""
        app: faust.App = self.app
        app.on_partitions_revoked.connect(self._rebalancing)  # type: ignore[arg-type]
        app.on_partitions_assigned.connect(self._rebalancing)  # type: ignore[arg-type]
        app.on_rebalance_complete.connect(self._recovered)  # type: ignore[arg-type]
        app.task(self._start_alerts)
        app.timer(self.rules.failure_rate.check_seconds, on_leader=True)(self._check_failure_rate)
        app.timer(1.0)(self._tick)
        app.timer(60.0)(self._release_memory)

    # -- the topic gate (runs in a thread, before Faust's producer and consumer start) ------------

    def _await_topics(self, stop: threading.Event) -> None:
        layout = await_partitions(
            self.settings.kafka_bootstrap,
            self.topics,
            create_partitions=self.settings.topic_partitions,
            group=self.app.conf.id,
            on_wait=self._waiting,
            stop=stop,
            replication=self.settings.replication(),
        )
        if layout is None:
            return
        partitions = layout.partitions
        set_partitions(self.app, self.table, partitions)
        set_replication(self.app, self.table, layout.replication, layout.min_insync)
        self.view.partitions = partitions
        self.readiness.recovering()
        log.info(
            "worker: the %d topics it reads have %d partitions each; recovering", len(self.topics.sources), partitions
        )

    def _waiting(self, what: str) -> None:
        self.readiness.waiting(what)
        log.info("worker not ready: %s", what)

    def _gate_failed(self, exc: Exception) -> None:
        self.fail(exc if isinstance(exc, StreamsError) else WorkerStopped(f"waiting for the topics failed: {exc!r}"))

    # -- rebalances ------------------------------------------------------------------------------

    async def _rebalancing(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        self.readiness.recovering()

    async def _recovered(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        """Faust restored the table: load this worker's books from it before any event is processed."""
        try:
            active = self.active_partitions()
            self.processor.recover(active)
            await self.outbox.recovered(active)
        except StateUnreadable as exc:
            self.fail(
                StateUnreadable(
                    f"{exc}. The changelog {self.topics.changelog} was not written by this worker's version: "
                    f"delete it and the consumer group {self.app.conf.id}, and the worker rebuilds its state "
                    "from the event topics."
                )
            )
            await asyncio.get_running_loop().create_future()  # hold the recovery until the stop cancels it
        if not self._frozen:
            # What start-up allocated lives as long as the worker: keep it out of every later collection.
            gc.freeze()
            self._frozen = True
        self.readiness.ready()

    # -- what the app's consumer, tasks and pages call ---------------------------------------------

    async def process_records(self, records: Records) -> None:
        """One fetch of the event topics: through the processor, its state writes to the producer,
        its alerts to the outbox once those are acknowledged. The consumer acks the records after."""
        messages = [_event_message(r) for recs in records.values() for r in recs]
        async with self.state_lock:
            raised = self.processor.process_by_partition(messages)
            written = await self.store.flush()
        for partition, alerts in raised.items():
            self.outbox.committed(partition, alerts, written.get(partition))

    def active_partitions(self) -> set[int]:
        source = self.topics.sources[0]
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == source}

    def _peers(self) -> list[str]:
        try:
            return [str(u) for u in self.app.router.table_metadata(TABLE)]
        except (KeyError, AttributeError):
            return []

    def _is_ready(self) -> bool:
        return self.readiness.is_ready

    async def consumer_lag(self) -> dict[Partition, int]:
        """The group's lag on the partitions this worker processes (asked of Kafka in a thread)."""
        active = sorted(self.active_partitions())
        wanted = [(t, p) for t in self.topics.sources for p in active]
        return await asyncio.to_thread(self.group_lag.query, wanted)

    def _horizon(self, topic: str, partition: int, next_offset: int) -> int | None:
        """Up to which `received_at` the topic's partition holds nothing unread past `next_offset`.

        When it was read to the end offset the broker gave, it holds nothing received before the
        events the worker had read when it asked: the gateway stamps `received_at` as it produces,
        so whatever came later is no older. (The end offsets a fetch brings are not enough: Faust
        pauses the fetching of partitions whose buffers are full, and theirs go stale.)
        """
        known = self._ends.get(TP(topic, partition))
        if known is None or next_offset < known[0]:
            return None
        return known[1]

    async def _release_memory(self) -> None:
        release_free_memory()

    async def _tick(self) -> None:
        """Every second: ask the broker for the end offsets of this worker's event topic partitions,
        then move the clocks on and drop what they passed, also where no event came meanwhile."""
        active = self.active_partitions()
        if not active or not self.readiness.is_ready:
            return
        read = self.processor.newest
        tps = [TP(t, p) for t in self.topics.sources for p in sorted(active)]
        try:
            ends = await self.app.consumer.highwaters(*tps)
        except Exception as exc:  # a rebalance, Kafka away: the clocks wait for the next answer
            log.debug("end offsets of the event topics not read: %s", exc)
            return
        self._ends = {TP(tp.topic, tp.partition): (int(end), read) for tp, end in ends.items() if end is not None}
        async with self.state_lock:
            if self.readiness.is_ready and self.processor.tick(self.active_partitions()):
                await self.store.flush()

    async def _publish(self, alerts: list[Alert]) -> None:
        """Put alerts on `<prefix>.alerts` and wait until the broker has them all."""
        send, topic = self.app.producer.send, self.topics.alerts
        sent = [await send(topic, alert.id.encode(), encode_alert(alert), None, None, None) for alert in alerts]
        for fut in sent:
            await fut

    def _published_since(self, since_ms: int) -> set[str]:
        return ids_on_topic(self.settings.kafka_bootstrap, self.topics.alerts, since_ms)

    def state(self) -> dict[str, Any]:
        """What `/api/state` shows: this worker's partitions' live state and its outbox."""
        parts = {p: self.processor.stats(p)._asdict() for p in sorted(self.active_partitions())}
        return {
            "ready": self.readiness.is_ready,
            "partitions": parts,
            "calls": sum(s["calls"] for s in parts.values()),
            "windows": sum(s["windows"] for s in parts.values()),
            "expired": sum(s["expired"] for s in parts.values()),
            "outbox": self.outbox.stats(),
            "lifetime_s": {"analyzed": self.settings.call_ttl_analyzed_s, "idle": self.settings.call_ttl_idle_s},
        }

    async def _start_alerts(self) -> None:
        # A batch sends one changelog write per call it touched; Faust's default (100 pending
        # messages) would stall the stream on every batch until the producer caught up.
        set_producer_buffer(self.app, self.settings.batch_size * 4)
        self.feed.start()
        await self.sender.run()

    async def _check_failure_rate(self) -> None:
        rule = self.rules.failure_rate
        # Until the feed has read the alerts raised before (by this worker's predecessor too), the
        # throttle does not know them.
        if not rule.enabled or not self.readiness.is_ready or not self.feed.loaded.is_set():
            return
        # Throttling survives a restart or a new leader: the feed holds the alerts raised before.
        last = self._last_rate_alert
        for agent, at in self.feed.last_by_rule_agent(RATE_RULE).items():
            last[agent] = max(last.get(agent, 0), at)
        now = int(time.time() * 1000)
        books, _ = await self.view.books(since=now - now % WINDOW_MS - rule.window_minutes * WINDOW_MS)
        for alert in failure_rate_alerts(rule, self.view.windows(books), now, last):
            log.info("alert %s", alert.text)
            await self.alerts_topic.send(key=alert.agent_id.encode(), value=encode_alert(alert))
            self.sender.submit(alert)


def _new_app(cfg: WorkerSettings) -> App:
    return App(
        f"{cfg.app_id}-{cfg.topic_prefix}",
        broker=f"kafka://{cfg.kafka_bootstrap}",
        store="memory://",
        topic_partitions=cfg.topic_partitions,
        value_serializer="raw",
        key_serializer="raw",
        web_host=cfg.web_host,
        # Faust binds to every interface unless told: listen where the settings say, and nowhere else.
        web_bind=cfg.web_host,
        web_port=cfg.web_port,
        canonical_url=cfg.web_url or f"http://{cfg.web_host}:{cfg.web_port}",
        datadir=cfg.data_dir,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=cfg.batch_size * 4,
        # On a rebalance Faust must wait for the batch being processed before it recovers the
        # table (the consumer's wait_empty waits for it): recovery replays the changelog into the
        # same in-memory table, and a batch processed during the replay would have its writes
        # overwritten by older values while its offsets are still committed, so its events would
        # be lost from the live totals.
        stream_wait_empty=True,
        broker_commit_every=cfg.batch_size * 4,
        web_router_enabled=True,
        # Faust's /table/<name>/<key> would serve the calls' raw state: the worker's pages do not need it.
        web_tables_enabled=False,
        # Every batch writes its calls' states to the changelog: let the producer batch them.
        producer_linger_ms=10,
        producer_max_batch_size=1_048_576,
        # The changelog takes records up to 16 MiB (streams/topics.py): a commit record of a large batch.
        producer_max_request_size=16 * 1_048_576,
        # Event bodies run to 30 KB: aiokafka's default 1 MB per partition and fetch would hand
        # the stream a few dozen call_analyzed at a time.
        consumer_max_fetch_size=8 * 1_048_576,
        broker_max_poll_records=cfg.batch_size,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=max(1.0, cfg.session_timeout_s / 4),
    )


def _event_message(record: Any) -> EventMessage:
    """An aiokafka record's event name (the gateway's `event` header, else the topic's suffix) and
    `received_at` ms (the header, else the record's timestamp)."""
    headers = dict(record.headers) if record.headers else {}
    raw = headers.get(Header.EVENT)
    name = raw.decode(errors="replace") if raw else record.topic.rpartition(".")[2] or UNKNOWN
    raw = headers.get(Header.RECEIVED_AT)
    at = int(raw) if raw and raw.isdigit() else 0
    if not at:
        at = int(record.timestamp) if record.timestamp else int(time.time() * 1000)
    key = record.key if isinstance(record.key, bytes) else str(record.key or "").encode()
    return EventMessage(record.partition, name, key, record.value or b"", at, record.topic, record.offset)


def _raised(alert: Alert) -> None:
    log.info("alert %s", alert.text)
