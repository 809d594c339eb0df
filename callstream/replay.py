"""`callstream replay dead-letter|unknown`: route those topics' events again, after a fix or a catalogue update.

Each event is routed as the gateway routes a delivery (`gateway.routing.route`: the same decoding,
event names and keys), and what now routes to another topic is written there with the gateway's
key and headers (`event`, and the original `received_at`, `signed_at`, `source_ip`), plus
`replayed_from` = `<topic>[<partition>]@<offset>`. What still cannot be routed, or routes to the
topic it is on (a type the catalogue still does not know), stays where it is. An event that carries
`replayed_from` was replayed once already and came back (the sink dead-lettered it again): it is
never replayed again, so a record the loader cannot take does not go round for ever.

Dead letters the sink wrote (they carry `source_topic`: they routed fine at the gateway but could not
be loaded) are routed like the others, so they go back to their event topic: right after a fix to
the loader, and the worker counts a call's event once however often it comes.

Exactly once, also across a crash: the run reads with a consumer group of its own
(`callstream-replay-<prefix>-<source>`) from where the last run stopped up to the end the topic had
when it started, and writes each batch in one Kafka transaction together with the group's offsets.
A crash leaves the last batch's transaction open; the next run (same transactional id) aborts it
and starts after the last committed batch, so nothing is written twice and nothing is skipped.
Consumers reading committed data (the sink; librdkafka's default) never see an aborted copy; the
worker reads uncommitted data, but counts a call's event once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from gateway.errors import PayloadError
from gateway.routing import Route, route
from kernel.catalogue import DEAD_LETTER, UNKNOWN, Header, topic
from kernel.errors import CallstreamError
from kernel.settings import CommonSettings
from kernel.topics import ensure_topics

log = logging.getLogger(__name__)
# librdkafka's own lines (every failed connection, a coordinator still loading): failures raise instead.
_librdkafka = logging.getLogger("callstream.replay.librdkafka")
_librdkafka.setLevel(logging.CRITICAL)

SOURCES = {"dead-letter": DEAD_LETTER, "unknown": UNKNOWN}
# Headers that describe the old placement, not the event: a routed copy does not carry them.
_NOT_CARRIED = frozenset(
    {Header.EVENT, Header.REASON, Header.SOURCE_TOPIC, "source_partition", "source_offset", Header.REPLAYED_FROM}
)
Headers = list[tuple[str, str | bytes | None]]


class ReplayError(CallstreamError):
    """Kafka refused the replay (unreachable, or another replay of the same topic took over)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one event goes: `route` and `headers` when it is written, else why it stays."""

    stays: str | None  # None: written to route.topic; else "unroutable", "same topic" or "replayed before"
    route: Route | None = None
    headers: Headers = field(default_factory=list)
    reason: str = ""


def decide(
    value: bytes | None, headers: Headers, prefix: str, source_topic: str, where: str, written_ms: int
) -> Decision:
    """Route one event of `source_topic` again; `where` names it (`topic[partition]@offset`), and
    `written_ms` is when it was written there (the `received_at` of an event that has none)."""
    if any(k == Header.REPLAYED_FROM for k, _ in headers):
        return Decision("replayed before")
    try:
        r = route(value or b"", prefix)
    except PayloadError as exc:
        return Decision("unroutable", reason=str(exc).split(":")[0])
    if r.topic == source_topic:
        return Decision("same topic", r)
    kept = [(k, v) for k, v in headers if k not in _NOT_CARRIED]
    if not any(k == Header.RECEIVED_AT for k, _ in kept):
        kept.append((Header.RECEIVED_AT, str(written_ms).encode()))
    return Decision(None, r, [(Header.EVENT, r.event.encode()), *kept, (Header.REPLAYED_FROM, where.encode())])


@dataclass
class ReplayStats:
    read: int = 0
    written: Counter[str] = field(default_factory=Counter)  # topic -> events written there
    stayed: Counter[str] = field(default_factory=Counter)  # why -> events left on the source topic
    reasons: Counter[str] = field(default_factory=Counter)  # still unroutable, by reason
    from_sink: int = 0  # dead letters the sink wrote (records it could not load)

    def add(self, d: Decision, from_sink: bool) -> None:
        self.read += 1
        self.from_sink += from_sink
        if d.stays is None:
            assert d.route is not None
            self.written[d.route.topic] += 1
        else:
            self.stayed[d.stays] += 1
            if d.reason:
                self.reasons[d.reason] += 1

    def summary(self, source: str, dry_run: bool) -> list[str]:
        verb = "would write" if dry_run else "wrote"
        n = sum(self.written.values())
        out = [f"replay {source}: read {self.read} events, {verb} {n}, {sum(self.stayed.values())} stay on {source}"]
        out += [f"  {t}: {c}" for t, c in sorted(self.written.items())]
        labels = {
            "unroutable": "still cannot be routed",
            "same topic": "route to the topic they are on",
            "replayed before": "were replayed once already (never again)",
        }
        out += [f"  {c} {labels[why]}" for why, c in sorted(self.stayed.items())]
        out += [f"    {c}: {reason}" for reason, c in self.reasons.most_common(5)]
        if self.from_sink:
            out.append(f"  {self.from_sink} of the events read were dead-lettered by the sink")
        return out


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "logger": _librdkafka,
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )


class Replay:
    """One run over one source topic: from the group's committed offsets to the end it has at start."""

    def __init__(
        self,
        cfg: CommonSettings,
        source: str,
        batch_size: int = 500,
        dry_run: bool = False,
        from_beginning: bool = False,
    ) -> None:
        self.bootstrap = cfg.kafka_bootstrap
        self.prefix = prefix = cfg.topic_prefix
        self.partitions = cfg.topic_partitions
        self.source = topic(prefix, SOURCES[source])
        self.batch_size = batch_size
        self.dry_run = dry_run
        self.from_beginning = from_beginning
        self.group = f"callstream-replay-{prefix}-{SOURCES[source]}"
        self.stats = ReplayStats()
        self.stop = threading.Event()
        self.consumer = _consumer(self.bootstrap, self.group)
        self.producer: Producer | None = None
        self._end: dict[int, int] = {}  # partition -> the offset this run stops at
        self._next: dict[int, int] = {}  # partition -> the next offset to read (what is committed)
        self._at_end: set[int] = set()  # partitions read up to the end (committed data only)
        self._in_transaction = False

    def _assign(self) -> int:
        """Assign the source's partitions at the committed offsets; return how many events lie ahead."""
        try:
            meta = self.consumer.list_topics(self.source, timeout=15).topics.get(self.source)
        except KafkaException as exc:
            raise ReplayError(
                f"cannot reach Kafka at {self.bootstrap} ({exc.args[0].str() if exc.args else exc}): is it running? "
                "(`callstream kafka start` for a local one)"
            ) from exc
        if meta is None or meta.error is not None or not meta.partitions:
            return 0
        tps = [TopicPartition(self.source, p) for p in sorted(meta.partitions)]
        committed = {tp.partition: tp.offset for tp in self._committed(tps)}
        for tp in tps:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=15)
            tp.offset = low if self.from_beginning else max(committed.get(tp.partition, -1), low)
            self._end[tp.partition], self._next[tp.partition] = high, tp.offset
        todo = [tp for tp in tps if tp.offset < self._end[tp.partition]]
        if todo:
            self.consumer.assign(todo)
        return sum(self._end[tp.partition] - tp.offset for tp in todo)

    def _committed(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        """The group's committed offsets; its coordinator can take a moment to be found (a new group,
        a broker just started)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return list(self.consumer.committed(tps, timeout=15))
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if not (isinstance(err, KafkaError) and err.retriable()) or time.monotonic() > deadline:
                    raise
                log.info("replay: waiting for the consumer group's coordinator (%s)", err.str())
                time.sleep(0.5)

    def _open_producer(self) -> Producer:
        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "transactional.id": self.group,
                "compression.type": "lz4",
                "linger.ms": 5,
                "client.id": "callstream-replay",
                "logger": _librdkafka,
            }
        )
        # Fences a crashed run of the same topic, aborting the transaction it left open.
        producer.init_transactions(30)
        return producer

    def _done(self) -> bool:
        return all(self._next[p] >= end or p in self._at_end for p, end in self._end.items())

    def _take(self) -> list[Message]:
        """The next events up to the batch size, within this run's end of each partition."""
        out: list[Message] = []
        deadline = time.monotonic() + 1.0
        while len(out) < self.batch_size and not self._done() and time.monotonic() < deadline:
            for msg in self.consumer.consume(self.batch_size - len(out), timeout=0.2):
                p, err = int(msg.partition() or 0), msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        # Past transaction markers too (they take offsets): where the next run starts.
                        self._next[p] = max(self._next[p], min(int(msg.offset() or 0), self._end[p]))
                        self._at_end.add(p)
                    else:
                        log.warning("replay: %s", err)
                    continue
                offset = int(msg.offset() or 0)
                if offset >= self._end[p]:  # written after the run started: the next run's
                    self._next[p] = max(self._next[p], self._end[p])
                    self.consumer.pause([TopicPartition(self.source, p)])
                    continue
                self._next[p] = offset + 1
                out.append(msg)
        return out

    def _handle(self, msg: Message) -> None:
        headers: Any = msg.headers() or []
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        kind, ts = msg.timestamp()
        written = ts if kind and ts > 0 else int(time.time() * 1000)
        d = decide(msg.value(), headers, self.prefix, self.source, where, written)
        self.stats.add(d, from_sink=any(k == Header.SOURCE_TOPIC for k, _ in headers))
        if d.stays is None and self.producer is not None:
            assert d.route is not None
            self.producer.produce(d.route.topic, value=msg.value(), key=d.route.key.encode(), headers=d.headers)
            self.producer.poll(0)

    def _commit(self) -> None:
        """The batch's events and the offsets after them, in one transaction (a dry run commits nothing)."""
        if self.producer is None:
            return
        offsets = [TopicPartition(self.source, p, o) for p, o in self._next.items()]
        self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
        self.producer.commit_transaction(60)
        self._in_transaction = False

    def run(
        self, progress: Callable[[int], None] = lambda n: None, on_total: Callable[[int], None] = lambda n: None
    ) -> ReplayStats:
        """Replay up to the end the topic has now (or until `stop` is set, after the current batch)."""
        try:
            if not self.dry_run:
                ensure_topics(self.bootstrap, self.prefix, partitions=self.partitions)
                # Before the offsets are read: a run still going stops committing from here on.
                self.producer = self._open_producer()
            total = self._assign()
            on_total(total)
            if not total:
                return self.stats
            while not self._done() and not self.stop.is_set():
                if self.producer is not None:
                    self.producer.begin_transaction()
                    self._in_transaction = True
                batch = self._take()
                for msg in batch:
                    self._handle(msg)
                self._commit()
                progress(len(batch))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError._FENCED:
                self._in_transaction = False  # the run that fenced this one aborts it
                raise ReplayError(
                    f"another `callstream replay` of {self.source} started and took over; this one stopped "
                    "(what it committed stays, nothing is written twice)"
                ) from exc
            raise ReplayError(f"replaying {self.source} failed: {err.str() if err else exc}") from exc
        finally:
            self._close()
        return self.stats

    def _close(self) -> None:
        try:
            if self.producer is not None and self._in_transaction:
                self.producer.abort_transaction(10)  # a batch cut short: its offsets were not committed either
        except KafkaException as exc:
            log.warning("replay: aborting the unfinished batch failed (the next run aborts it): %s", exc)
        finally:
            self.consumer.close()
