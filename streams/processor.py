"""Batches of events into per-call state and per-partition metrics, recoverable without double counting.

Every event topic is keyed by the call id and has the same partition count, so all of one call's
events land on the same partition number and are processed by the worker that owns it. Each
partition `p` has its own book of metrics (running totals and 1-minute windows, per agent and for
`ALL`); the group-wide view is the sum of the partitions' books. Nothing keyed by agent is ever
written from two partitions, so the changelog of partition `p` holds everything `p` needs.

One table holds, per partition `p`: `c:<call id>` (the call's state), `w:<p>:<minute>` (a window),
`a:<p>:<alert id>` (an alert raised and not yet delivered: the outbox, see streams/outbox.py),
`p:<p>` (the commit record) and `e:<p>` (the end marker). A batch writes, in this order and all to
changelog partition `p`: the commit record (the book's running totals, the partition's clock, plus
the new values of every window, call and alert the batch touched and the keys it dropped), then
those alerts, windows and calls, the tombstones of what it dropped, and last the end marker with
the commit's sequence number. Kafka keeps one partition's writes in order and a crashed producer
loses only a tail of them, so after a SIGKILL the recovered changelog is a prefix of what was
written: if the commit record of a batch survived but its end marker did not, overlaying its
windows, calls, alerts and drops on the table restores that batch whole; if the commit record did
not survive, the batch left no trace and its events (not yet committed as consumed, since Faust
flushes the producer before committing offsets) are processed again. Events of batches whose commit
record survived but whose offsets Faust had not committed yet are read again too, and skipped: the
commit record holds how far the partition had read each topic. Either way each event counts
exactly once. When the end marker survived nothing is overlaid, so an alert the outbox delivered
and deleted after the batch is not brought back.

A call's state is dropped (a tombstone, and the changelog topic is compacted) once the partition's
clock has passed its lifetime (streams/lifetime.py). The clock is event time: the oldest
`received_at` the partition has reached on any of its event topics that still has unread messages,
never going back. A delivery for a call without state that is older than the clock by more than the
shortest lifetime, or whose call's own timestamps are, may belong to a call already dropped: it is
counted in `late_events` only (and remembered, so its repeats are not), never in the totals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

import msgspec

from streams.alertrules import AlertConfig
from streams.calls import CallState, Raised, apply_event, call_time, decode_body
from streams.errors import StateUnreadable
from streams.lifetime import Expiry, Lifetime
from streams.metrics import ALL, RETENTION_MS, Agg, Effects, window_start

log = logging.getLogger(__name__)
T = TypeVar("T")

_enc = msgspec.msgpack.Encoder()
_dec_state = msgspec.msgpack.Decoder(CallState)


class Book(msgspec.Struct):
    """One partition's metrics: running totals and 1-minute windows, each per agent and `ALL`."""

    seq: int = 0
    totals: dict[str, Agg] = msgspec.field(default_factory=dict)
    windows: dict[int, dict[str, Agg]] = msgspec.field(default_factory=dict)


class Mark(msgspec.Struct, array_like=True):
    """How far a partition has read one event topic: the latest `received_at` and the next offset."""

    at: int
    next: int


class Commit(msgspec.Struct):
    seq: int
    totals: dict[str, Agg]
    windows: dict[int, dict[str, Agg]]
    calls: dict[bytes, bytes]
    # Written by this version on; an older version's commit record decodes with the defaults.
    clock: int = 0
    marks: dict[str, Mark] = msgspec.field(default_factory=dict)
    gone: list[bytes] = msgspec.field(default_factory=list)  # calls and windows the batch dropped
    alerts: dict[bytes, bytes] = msgspec.field(default_factory=dict)  # outbox entries it added


_dec_commit = msgspec.msgpack.Decoder(Commit)
_dec_window = msgspec.msgpack.Decoder(dict[str, Agg])


class Store(Protocol):
    """The table, seen as raw bytes keyed by bytes, with writes sent to a given changelog partition."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, partition: int, key: bytes, value: bytes | None) -> None: ...

    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Set (or delete) a key locally without writing it to the changelog (the next commit writes it)."""

    def keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]: ...

    def keys_of(self, partition: int, prefix: bytes) -> Iterator[bytes]:
        """The keys of `partition` (the changelog partition they were written to) starting with `prefix`."""


@dataclass
class DictStore:
    """A Store over a plain dict that records its changelog: for unit tests and the benchmark."""

    data: dict[bytes, bytes] = field(default_factory=dict)
    changelog: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    partitions: dict[bytes, int] = field(default_factory=dict)

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        self.restore(partition, key, value)
        self.changelog.append((partition, key, value))

    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.data.pop(key, None)
            self.partitions.pop(key, None)
        else:
            self.data[key] = value
            self.partitions[key] = partition

    def keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]:
        return (k for k in list(self.data) if k.startswith(prefix))

    def keys_of(self, partition: int, prefix: bytes) -> Iterator[bytes]:
        return (k for k, p in list(self.partitions.items()) if p == partition and k.startswith(prefix))

    @classmethod
    def replayed(cls, changelog: Iterable[tuple[int, bytes, bytes | None]]) -> DictStore:
        """The table a worker recovers from `changelog` (a prefix of one, after a crash)."""
        store = cls()
        for partition, key, value in changelog:
            store.restore(partition, key, value)
        return store


class EventMessage(msgspec.Struct, array_like=True):
    """One consumed event message, as much as the processor needs of it."""

    partition: int
    event: str
    key: bytes
    value: bytes
    received_at: int  # unix ms at the gateway
    topic: str = ""
    offset: int = -1


class Alert(msgspec.Struct):
    """An alert as written to `<prefix>.alerts` (JSON) and posted to the webhook."""

    id: str
    rule: str
    agent_id: str
    text: str
    at: int  # unix ms of the event (or the window check) that raised it
    call_id: str | None = None
    reason: str | None = None
    value: float | None = None


class Pending(msgspec.Struct, array_like=True):
    """An outbox entry: an alert committed and not yet delivered, and when it was raised (wall clock,
    unix ms: where a look at the alerts topic for an earlier delivery of it starts)."""

    alert: Alert
    raised: int


_enc_pending = msgspec.msgpack.Encoder()
decode_pending = msgspec.msgpack.Decoder(Pending).decode

_ALERT_WHAT = {
    "failed_dial": "call did not connect",
    "error": "call ended on an error",
    "unsuccessful": "call was not successful",
    "negative_sentiment": "caller sentiment was negative",
    "transfer_cancelled": "transfer was cancelled",
}


def commit_key(partition: int) -> bytes:
    return b"p:%d" % partition


def end_key(partition: int) -> bytes:
    return b"e:%d" % partition


def window_key(partition: int, start: int) -> bytes:
    return b"w:%d:%d" % (partition, start)


def call_key(call_id: bytes) -> bytes:
    return b"c:" + call_id


def outbox_prefix(partition: int) -> bytes:
    return b"a:%d:" % partition


def outbox_key(partition: int, alert_id: str) -> bytes:
    return outbox_prefix(partition) + alert_id.encode()


class Restored(NamedTuple):
    """What a commit record restored: written again with the partition's next commit, in case the
    crash lost them before they reached the changelog."""

    windows: set[int]
    calls: dict[bytes, bytes]
    gone: list[bytes]
    alerts: list[bytes]


@dataclass
class Partition:
    """What the processor keeps of one partition beside its book: its clock, how far it read each
    event topic, its live calls by due time."""

    clock: int = 0
    marks: dict[str, Mark] = field(default_factory=dict)
    expiry: Expiry = field(default_factory=lambda: Expiry(Lifetime().bucket_ms))
    restored: Restored | None = None
    unaged: list[bytes] = field(default_factory=list)  # states without `last_at`: timed from the next clock
    expired: int = 0  # call states dropped since this worker loaded the partition


class PartitionStats(NamedTuple):
    calls: int  # live call states
    windows: int
    clock: int  # the partition's event-time clock, unix ms
    expired: int  # call states dropped since the worker loaded the partition


@dataclass
class _Batch:
    """What one batch did to one partition, until its commit is written."""

    windows: set[int] = field(default_factory=set)  # window starts touched
    states: dict[bytes, CallState] = field(default_factory=dict)
    changed: set[bytes] = field(default_factory=set)  # call keys whose state changed
    gone: list[bytes] = field(default_factory=list)  # keys dropped
    alerts: list[Alert] = field(default_factory=list)


def _apply(book: Book, agent: str, received_at: int, effects: Effects, batch: _Batch, oldest: int) -> None:
    """Add `effects` to the totals, and to the event's window unless that is older than `oldest`."""
    targets = [book.totals]
    start = window_start(received_at)
    if start >= oldest:
        window = book.windows.get(start)
        if window is None:
            window = book.windows[start] = {}
        batch.windows.add(start)
        targets.append(window)
    for scope in (agent, ALL):
        for target in targets:
            agg = target.get(scope)
            if agg is None:
                agg = target[scope] = Agg()
            effects.apply_to(agg)


# Call states one batch drops at most (whole buckets of due times, so a little more): a clock that
# jumps hours ahead, once a lagging topic is read, spreads its drops over the next batches and keeps
# the commit record small.
DROPS_PER_BATCH = 2000

# For an event topic's partition read up to a given offset: the `received_at` up to which it is known
# to hold nothing more, or None when that is not known (the worker asks the broker, see worker.py).
Horizon = Callable[[str, int, int], int | None]


class Processor:
    """Applies batches of events to the table; hands every alert raised to `on_alert`.

    `sources` and `horizon` give the partition's clock its lower bound: an event topic the partition
    may still have unread messages on holds the clock at the latest `received_at` read from it. Without
    them (unit tests, benchmarks that feed a whole history) the clock is the latest `received_at` read.
    """

    def __init__(
        self,
        store: Store,
        rules: AlertConfig,
        on_alert: Callable[[Alert], None] = lambda a: None,
        *,
        lifetime: Lifetime | None = None,
        sources: Sequence[str] = (),
        horizon: Horizon | None = None,
    ) -> None:
        self.store = store
        self.rules = rules
        self.on_alert = on_alert
        self.lifetime = lifetime or Lifetime()
        self.sources = list(sources)
        self.horizon = horizon
        self.newest = 0  # the latest `received_at` read, of any partition
        self.books: dict[int, Book] = {}
        self.parts: dict[int, Partition] = {}
        self.invalid = 0
        self.now_ms: Callable[[], int] = lambda: int(time.time() * 1000)

    def reset(self) -> None:
        """Forget the loaded books: partitions moved (rebalance) and the table was recovered again."""
        self.books.clear()
        self.parts.clear()

    def recover(self, partitions: Iterable[int]) -> None:
        """Reload the books of `partitions` from the recovered table now, so that a changelog the
        worker cannot read stops it at once (StateUnreadable), not at the first event."""
        self.reset()
        for partition in partitions:
            self.book(partition)

    def book(self, partition: int) -> Book:
        book = self.books.get(partition)
        if book is None:
            book = self.books[partition] = self._load(partition)
        return book

    def part(self, partition: int) -> Partition:
        self.book(partition)
        return self.parts[partition]

    def stats(self, partition: int) -> PartitionStats:
        book, part = self.book(partition), self.parts[partition]
        return PartitionStats(len(part.expiry), len(book.windows), part.clock, part.expired)

    # -- loading a partition from the recovered table ---------------------------------------------

    def _load(self, partition: int) -> Book:
        book, part = Book(), Partition(expiry=Expiry(self.lifetime.bucket_ms))
        self.parts[partition] = part
        commit = self._commit_record(partition)
        if commit is not None:
            book.seq, book.totals = commit.seq, commit.totals
            part.clock, part.marks = commit.clock, commit.marks
            if self._tail_lost(partition, commit.seq):
                part.restored = self._overlay(partition, commit)
        prefix = b"w:%d:" % partition
        for key in self.store.keys_with_prefix(prefix):
            raw = self.store.get(key)
            if raw is not None:
                book.windows[int(key[len(prefix) :])] = _decode(_dec_window, partition, key, raw)
        if part.restored is not None and commit is not None:
            book.windows.update(commit.windows)
        for key in self.store.keys_of(partition, b"c:"):
            raw = self.store.get(key)
            if raw is not None:
                state = _decode(_dec_state, partition, key, raw)
                if state.last_at:
                    part.expiry.set(key, self.lifetime.expires_at(state, part.clock))
                else:  # an older version's: the clock it loaded with may be 0 (it kept none)
                    part.unaged.append(key)
        return book

    def _commit_record(self, partition: int) -> Commit | None:
        raw = self.store.get(commit_key(partition))
        return None if raw is None else _decode(_dec_commit, partition, commit_key(partition), raw)

    def _tail_lost(self, partition: int, seq: int) -> bool:
        """Whether the writes after the last commit record may be lost: its end marker is not there."""
        raw = self.store.get(end_key(partition))
        return raw is None or raw != b"%d" % seq

    def _overlay(self, partition: int, commit: Commit) -> Restored:
        """Put the last batch's writes on the table, as its commit record names them."""
        store = self.store
        for key in commit.gone:
            store.restore(partition, key, None)
        for key, value in (*commit.calls.items(), *commit.alerts.items()):
            store.restore(partition, key, value)
        return Restored(set(commit.windows), dict(commit.calls), list(commit.gone), list(commit.alerts))

    # -- processing ---------------------------------------------------------------------------------

    def process(self, batch: Iterable[EventMessage]) -> list[Alert]:
        return [alert for alerts in self.process_by_partition(batch).values() for alert in alerts]

    def process_by_partition(self, batch: Iterable[EventMessage]) -> dict[int, list[Alert]]:
        """Apply `batch`; the alerts it raised, by partition (each also in that partition's outbox)."""
        by_partition: dict[int, list[EventMessage]] = {}
        for message in batch:
            by_partition.setdefault(message.partition, []).append(message)
        raised: dict[int, list[Alert]] = {}
        for partition, messages in by_partition.items():
            alerts = self._process_partition(partition, messages)
            if alerts:
                raised[partition] = alerts
                for alert in alerts:
                    self.on_alert(alert)
        return raised

    def tick(self, partitions: Iterable[int]) -> bool:
        """Move the partitions' clocks on without events (the topics' ends are known anew) and drop
        what they passed; whether that wrote anything."""
        wrote = False
        for partition in partitions:
            book, part = self.book(partition), self.parts[partition]
            batch = _Batch()
            self._advance(partition, book, part, batch)
            if batch.gone or part.restored is not None:
                self._commit(partition, book, part, batch)
                wrote = True
        return wrote

    def _process_partition(self, partition: int, messages: list[EventMessage]) -> list[Alert]:
        book = self.book(partition)
        part = self.parts[partition]
        batch = _Batch()
        for message in messages:
            if _applied(part, message):
                continue
            _mark(part, message)
            if message.received_at > self.newest:
                self.newest = message.received_at
            self._apply_message(book, part, message, batch)
        self._advance(partition, book, part, batch)
        self._commit(partition, book, part, batch)
        return batch.alerts

    def _apply_message(self, book: Book, part: Partition, message: EventMessage, batch: _Batch) -> None:
        try:
            body = decode_body(message.value)
        except msgspec.DecodeError:
            self.invalid += 1
            log.warning(
                "skipped an undecodable %s message on partition %d (key %r)",
                message.event,
                message.partition,
                message.key[:64],
            )
            return
        key = call_key(message.key)
        state = self._state(key, batch)
        at = message.received_at
        late = state.late if state is not None else self.lifetime.is_late(at, call_time(body), part.clock)
        state, effects, raised = apply_event(state, message.event, body, self.rules)
        batch.states[key] = state
        if late:
            state.late = True
            effects, raised = (Effects(counts={"late_events": 1}) if not effects.empty() else effects), []
        newer = at > state.last_at
        if newer:
            state.last_at = at
        if effects.empty() and not raised and not newer:
            return
        batch.changed.add(key)
        if not effects.empty():
            _apply(book, state.agent, at, effects, batch, part.clock - RETENTION_MS)
        for r in raised:
            batch.alerts.append(_alert(r, message, state))

    def _state(self, key: bytes, batch: _Batch) -> CallState | None:
        state = batch.states.get(key)
        if state is not None:
            return state
        raw = self.store.get(key)
        return _dec_state.decode(raw) if raw is not None else None

    def _advance(self, partition: int, book: Book, part: Partition, batch: _Batch) -> None:
        """Move the clock on; drop the calls and windows it has passed."""
        clock = self._watermark(partition, part)
        if clock is not None and clock > part.clock:
            part.clock = clock
        lifetime, expiry = self.lifetime, part.expiry
        for key in part.unaged:
            if key not in expiry:
                expiry.set(key, part.clock + lifetime.idle_ms)
        part.unaged = []
        for key in batch.changed:
            expiry.set(key, lifetime.expires_at(batch.states[key], part.clock))
        for key in expiry.pop_due(part.clock, DROPS_PER_BATCH):
            batch.changed.discard(key)
            batch.states.pop(key, None)
            batch.gone.append(key)
            part.expired += 1
        oldest = part.clock - RETENTION_MS
        for start in [w for w in book.windows if w < oldest]:
            del book.windows[start]
            batch.windows.discard(start)
            batch.gone.append(window_key(partition, start))

    def _watermark(self, partition: int, part: Partition) -> int | None:
        """The partition's event time: the latest `received_at` read, held back by every event topic
        that may have unread messages to the latest read from it (its next message is no older);
        None when such a topic was never read. A topic read to its end does not hold it back, so a
        quiet partition's clock follows what the others read."""
        top = max((m.at for m in part.marks.values()), default=0)
        horizon = self.horizon
        if horizon is None:
            return top
        low: int | None = None
        for topic in self.sources:
            mark = part.marks.get(topic)
            known = horizon(topic, partition, mark.next if mark is not None else 0)
            if known is None and mark is None:
                return None
            bound = max(known or 0, mark.at if mark is not None else 0)
            low = bound if low is None else min(low, bound)
        return top if low is None else low

    def _commit(self, partition: int, book: Book, part: Partition, batch: _Batch) -> None:
        """Write the commit record, then what it names, then the end marker (see the module's docstring)."""
        store = self.store
        calls = {key: _enc.encode(batch.states[key]) for key in batch.changed}
        now = self.now_ms()
        alerts = {outbox_key(partition, a.id): _enc_pending.encode(Pending(a, now)) for a in batch.alerts}
        gone = batch.gone
        restored, part.restored = part.restored, None
        if restored is not None:
            _carry_over(store, book, batch, restored, calls, alerts)
        book.seq += 1
        windows = {w: book.windows[w] for w in batch.windows}
        record = Commit(book.seq, book.totals, windows, calls, part.clock, part.marks, gone, alerts)
        store.put(partition, commit_key(partition), _enc.encode(record))
        for key, value in alerts.items():
            store.put(partition, key, value)
        for start, window in windows.items():
            store.put(partition, window_key(partition, start), _enc.encode(window))
        for key, value in calls.items():
            store.put(partition, key, value)
        for key in gone:
            store.put(partition, key, None)
        store.put(partition, end_key(partition), b"%d" % book.seq)


def _applied(part: Partition, message: EventMessage) -> bool:
    """Whether a commit record that survived covers the message already: one read again after a
    crash or a rebalance (Faust commits offsets on an interval, the changelog every batch). Skipped,
    it cannot count as late when its call's state was dropped since. A message newer than the newest
    read from its topic is never skipped (a topic made again starts from offset 0)."""
    mark = part.marks.get(message.topic)
    return mark is not None and 0 <= message.offset < mark.next and message.received_at <= mark.at


def _mark(part: Partition, message: EventMessage) -> None:
    """Note how far the partition has read the message's topic."""
    mark = part.marks.get(message.topic)
    if mark is None:
        part.marks[message.topic] = Mark(message.received_at, message.offset + 1)
        return
    if message.received_at > mark.at:
        mark.at = message.received_at
    if message.offset >= mark.next:
        mark.next = message.offset + 1


def _carry_over(
    store: Store, book: Book, batch: _Batch, restored: Restored, calls: dict[bytes, bytes], alerts: dict[bytes, bytes]
) -> None:
    """Add what the last recovery restored to the next commit, unless changed or gone since."""
    gone = set(batch.gone)
    batch.windows |= {w for w in restored.windows if w in book.windows}
    for key, value in restored.calls.items():
        if key not in gone:
            calls.setdefault(key, value)
    for key in restored.gone:
        if key not in calls and key not in gone:
            batch.gone.append(key)
    for key in restored.alerts:
        entry = store.get(key)  # the outbox may have delivered and deleted it since
        if entry is not None:
            alerts.setdefault(key, entry)


def _decode(decoder: msgspec.msgpack.Decoder[T], partition: int, key: bytes, raw: bytes) -> T:
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise StateUnreadable(
            f"partition {partition} of the state table holds a record it cannot read ({key!r}: {exc})"
        ) from exc


def _alert(raised: Raised, message: EventMessage, state: CallState) -> Alert:
    call_id = message.key.decode(errors="replace")
    what = _ALERT_WHAT.get(raised.rule, raised.rule)
    text = f":rotating_light: [{raised.rule}] {what} ({raised.reason}) - agent {state.agent}, call {call_id}"
    return Alert(
        id=f"{raised.rule}:{call_id}",
        rule=raised.rule,
        agent_id=state.agent,
        text=text,
        at=message.received_at,
        call_id=call_id,
        reason=raised.reason,
    )
