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
from typing import Protocol

import msgspec

from streams.alertrules import AlertConfig
from streams.calls import CallState, Raised, apply_event, decode_body
from streams.metrics import ALL, RETENTION_MS, Agg, Effects, window_start

log = logging.getLogger(__name__)

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

    def keys_with_prefix(self, prefix: bytes) -> Iterator[bytes]:
        return (k for k in list(self.data) if k.startswith(prefix))


class In(msgspec.Struct, array_like=True):
    """One consumed message, as much as the processor needs of it."""

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


def commit_key(p: int) -> bytes:
    return b"p:%d" % p


def window_key(p: int, start: int) -> bytes:
    return b"w:%d:%d" % (p, start)


def call_key(call_id: bytes) -> bytes:
    return b"c:" + call_id


def _apply(book: Book, agent: str, ts: int, fx: Effects, touched: set[int]) -> None:
    start = window_start(ts)
    win = book.windows.get(start)
    if win is None:
        win = book.windows[start] = {}
    touched.add(start)
    for scope in (agent, ALL):
        for target in (book.totals, win):
            agg = target.get(scope)
            if agg is None:
                agg = target[scope] = Agg()
            fx.apply_to(agg)


class Processor:
    """Applies batches of events to the table; hands every alert raised to `on_alert`."""

    def __init__(self, store: Store, rules: AlertConfig, on_alert: Callable[[Alert], None] = lambda a: None) -> None:
        self.store = store
        self.rules = rules
        self.on_alert = on_alert
        self.books: dict[int, Book] = {}
        # Windows and calls restored from a commit record that must be written again with the next
        # commit, in case the crash lost them before they reached the changelog.
        self._carry: dict[int, tuple[set[int], dict[bytes, bytes]]] = {}
        self.invalid = 0

    def reset(self) -> None:
        """Forget the loaded books: partitions moved (rebalance) and the table was recovered again."""
        self.books.clear()
        self._carry.clear()

    def book(self, p: int) -> Book:
        book = self.books.get(p)
        if book is None:
            book = self.books[p] = self._load(p)
        return book

    def _load(self, p: int) -> Book:
        book = Book()
        prefix = b"w:%d:" % p
        for k in self.store.keys_with_prefix(prefix):
            raw = self.store.get(k)
            if raw is not None:
                book.windows[int(k[len(prefix) :])] = _dec_window.decode(raw)
        raw = self.store.get(commit_key(p))
        if raw is not None:
            commit = _dec_commit.decode(raw)
            book.seq, book.totals = commit.seq, commit.totals
            book.windows.update(commit.windows)
            data = getattr(self.store, "data", None)
            for k, v in commit.calls.items():
                if data is not None:
                    data[k] = v  # local only; the next commit writes it to the changelog again
            self._carry[p] = (set(commit.windows), dict(commit.calls))
        return book

    def process(self, batch: Iterable[In]) -> list[Alert]:
        by_partition: dict[int, list[In]] = {}
        for m in batch:
            by_partition.setdefault(m.partition, []).append(m)
        alerts: list[Alert] = []
        for p, msgs in by_partition.items():
            alerts.extend(self._process_partition(p, msgs))
        for a in alerts:
            self.on_alert(a)
        return alerts

    def _process_partition(self, p: int, msgs: list[In]) -> list[Alert]:
        store, rules = self.store, self.rules
        book = self.book(p)
        touched: set[int] = set()
        states: dict[bytes, CallState] = {}
        dirty: set[bytes] = set()
        alerts: list[Alert] = []
        newest = 0
        for m in msgs:
            try:
                body = decode_body(m.value)
            except msgspec.DecodeError:
                self.invalid += 1
                log.warning("skipped an undecodable %s message on partition %d (key %r)", m.event, p, m.key[:64])
                continue
            k = call_key(m.key)
            st = states.get(k)
            if st is None:
                raw = store.get(k)
                st = _dec_state.decode(raw) if raw is not None else None
            st, fx, raised = apply_event(st, m.event, body, rules)
            states[k] = st
            if fx.empty() and not raised:
                continue
            dirty.add(k)
            _apply(book, st.agent, m.received_at, fx, touched)
            newest = max(newest, m.received_at)
            for r in raised:
                alerts.append(self._alert(r, m, st))
        carry = self._carry.pop(p, None)
        if not dirty and carry is None:
            return alerts
        calls = {k: _enc.encode(states[k]) for k in dirty}
        if carry is not None:
            touched |= {w for w in carry[0] if w in book.windows}
            for k, v in carry[1].items():
                calls.setdefault(k, v)
        dropped = [w for w in book.windows if newest and w < newest - RETENTION_MS]
        for w in dropped:
            del book.windows[w]
            touched.discard(w)
        book.seq += 1
        windows = {w: book.windows[w] for w in touched}
        store.put(p, commit_key(p), _enc.encode(Commit(book.seq, book.totals, windows, calls)))
        for w, win in windows.items():
            store.put(p, window_key(p, w), _enc.encode(win))
        for k, v in calls.items():
            store.put(p, k, v)
        for w in dropped:
            store.put(p, window_key(p, w), None)
        return alerts

    @staticmethod
    def _alert(r: Raised, m: In, st: CallState) -> Alert:
        call_id = m.key.decode(errors="replace")
        what = {
            "failed_dial": "call did not connect",
            "error": "call ended on an error",
            "unsuccessful": "call was not successful",
            "negative_sentiment": "caller sentiment was negative",
            "transfer_cancelled": "transfer was cancelled",
        }.get(r.rule, r.rule)
        text = f":rotating_light: [{r.rule}] {what} ({r.reason}) - agent {st.agent}, call {call_id}"
        return Alert(
            id=f"{r.rule}:{call_id}",
            rule=r.rule,
            agent_id=st.agent,
            text=text,
            at=m.received_at,
            call_id=call_id,
            reason=r.reason,
        )
