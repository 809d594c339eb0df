"""Batches of events into per-call state and per-partition metrics, recoverable without double counting.

Every event topic is keyed by the call id and has the same partition count, so all of one call's
events land on the same partition number and are processed by the worker that owns it. Each
partition `p` has its own book of metrics (running totals and 1-minute windows, per agent and for
`ALL`); the group-wide view is the sum of the partitions' books. Nothing keyed by agent is ever
written from two partitions, so the changelog of partition `p` holds everything `p` needs.

One table holds, per partition `p`: `c:<call id>` (the call's state), `w:<p>:<minute>` (a window)
and `p:<p>` (the commit record). A batch writes, in this order and all to changelog partition `p`:
the commit record (the book's running totals, plus the new values of every window and call the
batch touched), then those windows and calls. Kafka keeps one partition's writes in order and a
crashed producer loses only a tail of them, so after a SIGKILL the recovered changelog is a prefix
of what was written: if the commit record of a batch survived, overlaying its windows and calls
on the table restores that batch whole; if it did not, the batch left no trace and its events
(not yet committed as consumed, since Faust flushes the producer before committing offsets) are
processed again. Either way each event counts exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

import msgspec

from streams.alertrules import AlertConfig
from streams.calls import CallState, Raised, apply_event, decode_body
from streams.errors import StateUnreadable
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


class Commit(msgspec.Struct):
    seq: int
    totals: dict[str, Agg]
    windows: dict[int, dict[str, Agg]]
    calls: dict[bytes, bytes]


_dec_commit = msgspec.msgpack.Decoder(Commit)
_dec_window = msgspec.msgpack.Decoder(dict[str, Agg])


class Store(Protocol):
    """The table, seen as raw bytes keyed by bytes, with writes sent to a given changelog partition."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, partition: int, key: bytes, value: bytes | None) -> None: ...

    def restore(self, partition: int, key: bytes, value: bytes) -> None:
        """Set a key locally without writing it to the changelog (the next commit writes it)."""

    def keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]: ...


@dataclass
class DictStore:
    """A Store over a plain dict that records its changelog: for unit tests and the benchmark."""

    data: dict[bytes, bytes] = field(default_factory=dict)
    changelog: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value
        self.changelog.append((partition, key, value))

    def restore(self, partition: int, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]:
        return (k for k in list(self.data) if k.startswith(prefix))


class EventMessage(msgspec.Struct, array_like=True):
    """One consumed event message, as much as the processor needs of it."""

    partition: int
    event: str
    key: bytes
    value: bytes
    received_at: int  # unix ms at the gateway


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


_ALERT_WHAT = {
    "failed_dial": "call did not connect",
    "error": "call ended on an error",
    "unsuccessful": "call was not successful",
    "negative_sentiment": "caller sentiment was negative",
    "transfer_cancelled": "transfer was cancelled",
}


def commit_key(partition: int) -> bytes:
    return b"p:%d" % partition


def window_key(partition: int, start: int) -> bytes:
    return b"w:%d:%d" % (partition, start)


def call_key(call_id: bytes) -> bytes:
    return b"c:" + call_id


class Restored(NamedTuple):
    """What a commit record restored: written again with the partition's next commit, in case the
    crash lost them before they reached the changelog."""

    windows: set[int]
    calls: dict[bytes, bytes]


@dataclass
class _Batch:
    """What one batch did to one partition, until its commit is written."""

    windows: set[int] = field(default_factory=set)  # window starts touched
    states: dict[bytes, CallState] = field(default_factory=dict)
    changed: set[bytes] = field(default_factory=set)  # call keys whose state changed
    newest: int = 0  # the latest `received_at`


def _apply(book: Book, agent: str, received_at: int, effects: Effects, batch: _Batch) -> None:
    start = window_start(received_at)
    window = book.windows.get(start)
    if window is None:
        window = book.windows[start] = {}
    batch.windows.add(start)
    for scope in (agent, ALL):
        for target in (book.totals, window):
            agg = target.get(scope)
            if agg is None:
                agg = target[scope] = Agg()
            effects.apply_to(agg)


class Processor:
    """Applies batches of events to the table; hands every alert raised to `on_alert`."""

    def __init__(self, store: Store, rules: AlertConfig, on_alert: Callable[[Alert], None] = lambda a: None) -> None:
        self.store = store
        self.rules = rules
        self.on_alert = on_alert
        self.books: dict[int, Book] = {}
        self._restored: dict[int, Restored] = {}
        self.invalid = 0

    def reset(self) -> None:
        """Forget the loaded books: partitions moved (rebalance) and the table was recovered again."""
        self.books.clear()
        self._restored.clear()

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

    def _load(self, partition: int) -> Book:
        book = Book()
        prefix = b"w:%d:" % partition
        for key in self.store.keys_with_prefix(prefix):
            raw = self.store.get(key)
            if raw is not None:
                book.windows[int(key[len(prefix) :])] = _decode(_dec_window, partition, key, raw)
        raw = self.store.get(commit_key(partition))
        if raw is not None:
            commit = _decode(_dec_commit, partition, commit_key(partition), raw)
            book.seq, book.totals = commit.seq, commit.totals
            book.windows.update(commit.windows)
            for key, value in commit.calls.items():
                self.store.restore(partition, key, value)
            self._restored[partition] = Restored(set(commit.windows), dict(commit.calls))
        return book

    def process(self, batch: Iterable[EventMessage]) -> list[Alert]:
        by_partition: dict[int, list[EventMessage]] = {}
        for message in batch:
            by_partition.setdefault(message.partition, []).append(message)
        alerts: list[Alert] = []
        for partition, messages in by_partition.items():
            alerts.extend(self._process_partition(partition, messages))
        for alert in alerts:
            self.on_alert(alert)
        return alerts

    def _process_partition(self, partition: int, messages: list[EventMessage]) -> list[Alert]:
        book = self.book(partition)
        batch = _Batch()
        alerts: list[Alert] = []
        for message in messages:
            self._apply_message(book, message, batch, alerts)
        self._commit(partition, book, batch)
        return alerts

    def _apply_message(self, book: Book, message: EventMessage, batch: _Batch, alerts: list[Alert]) -> None:
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
        state = batch.states.get(key)
        if state is None:
            raw = self.store.get(key)
            state = _dec_state.decode(raw) if raw is not None else None
        state, effects, raised = apply_event(state, message.event, body, self.rules)
        batch.states[key] = state
        if effects.empty() and not raised:
            return
        batch.changed.add(key)
        _apply(book, state.agent, message.received_at, effects, batch)
        batch.newest = max(batch.newest, message.received_at)
        for r in raised:
            alerts.append(_alert(r, message, state))

    def _commit(self, partition: int, book: Book, batch: _Batch) -> None:
        """Write the commit record, then the windows and calls it names (see the module's docstring)."""
        restored = self._restored.pop(partition, None)
        if not batch.changed and restored is None:
            return
        calls = {key: _enc.encode(batch.states[key]) for key in batch.changed}
        if restored is not None:
            batch.windows |= {w for w in restored.windows if w in book.windows}
            for key, value in restored.calls.items():
                calls.setdefault(key, value)
        dropped = [w for w in book.windows if batch.newest and w < batch.newest - RETENTION_MS]
        for start in dropped:
            del book.windows[start]
            batch.windows.discard(start)
        book.seq += 1
        windows = {w: book.windows[w] for w in batch.windows}
        store = self.store
        store.put(partition, commit_key(partition), _enc.encode(Commit(book.seq, book.totals, windows, calls)))
        for start, window in windows.items():
            store.put(partition, window_key(partition, start), _enc.encode(window))
        for key, value in calls.items():
            store.put(partition, key, value)
        for start in dropped:
            store.put(partition, window_key(partition, start), None)


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
