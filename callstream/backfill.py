"""`callstream backfill FILE...`: calls from Retell's list-calls responses into the pipeline as `call_analyzed` events.

A file is a JSON array of call objects (what `POST /v2/list-calls` answers) or JSON Lines (one call
object per line), either of them gzipped (`.gz`). Files are read as streams, record by record, so a
file of any size takes the memory of one call (a JSON array is cut into its elements by the standard
library's C scanner, and each element's text is forwarded byte for byte).

Each call becomes the body `{"event": "call_analyzed", "call": <the call object>}`, checked by the
gateway's own routing (`gateway.routing.route`), keyed by `call_id`, with the gateway's headers:
`event`, `received_at` (the call's end, else its start: when its analysis would have arrived, so the
worker files it under that minute), `signed_at` (the same), and `backfilled_at` (this run). Calls that
have not ended (`registered`, `ongoing`) are skipped: their own webhook is still to come, and a stale
copy must not replace it. Running it twice, or over calls that live traffic delivered too, loads
nothing twice: the sink keeps one row per call (the latest delivery) and the worker counts each
call's `call_analyzed` once.

A malformed record (not JSON, not a call object, no `call_id`) is reported with its file and line
and skipped; `strict` stops the run at the first one instead. In a JSON array a syntax error ends
that file (nothing after it can be found reliably); the next file is read.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
from confluent_kafka import KafkaError, Message, Producer

from gateway.errors import PayloadError
from gateway.routing import route
from kernel.catalogue import EventName, Header
from kernel.errors import CallstreamError
from kernel.settings import CommonSettings
from kernel.topics import ensure_topics

log = logging.getLogger(__name__)

NOT_ENDED = frozenset({"registered", "ongoing"})
MAX_RECORD_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 20
_HEAD = b'{"event":"' + EventName.CALL_ANALYZED.value.encode() + b'","call":'


class BackfillError(CallstreamError):
    """A file cannot be read, a record is malformed under --strict, or Kafka refused events."""


@dataclass(frozen=True, slots=True)
class Bad:
    """A record that cannot be sent, and where it is."""

    where: str  # file:line
    reason: str
    rest_skipped: bool = False  # a JSON array cannot be resumed after a syntax error


@dataclass(frozen=True, slots=True)
class Call:
    """One call object's text and where it starts."""

    where: str
    text: bytes


class _Counted(io.RawIOBase):
    """A file that reports how many bytes were read from it (the progress bar follows the file on disk)."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None]) -> None:
        self.f = f
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)  # type: ignore[attr-defined]
        if n:
            self.on_read(n)
        return int(n or 0)

    def close(self) -> None:
        self.f.close()
        super().close()


def open_stream(path: Path, on_read: Callable[[int], None] = lambda n: None) -> BinaryIO:
    """The file's bytes, gunzipped when it is gzip (by its first bytes, whatever its name)."""
    try:
        raw = io.BufferedReader(_Counted(path.open("rb"), on_read), buffer_size=_CHUNK)
    except OSError as exc:
        raise BackfillError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def records(path: Path, on_read: Callable[[int], None] = lambda n: None) -> Iterator[Call | Bad]:
    """The call objects of one file, in order, with what cannot be read as `Bad`. A file that cannot
    be read on (a damaged gzip stream, bytes that are not UTF-8 in an array) raises `BackfillError`."""
    with open_stream(path, on_read) as f:
        try:
            line = 1
            while True:  # leading whitespace: the first other byte says which format this is
                first = f.peek(1)[:1]  # type: ignore[attr-defined]
                if first not in (b" ", b"\t", b"\r", b"\n"):
                    break
                line += f.read(1) == b"\n"
            if first == b"[":
                yield from _array(path, f, line)
            elif first:
                yield from _lines(path, f, line)
        except UnicodeDecodeError as exc:
            raise BackfillError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk)") from exc
        except (OSError, EOFError, zlib.error) as exc:
            raise BackfillError(f"cannot read {path} on: {exc} (a damaged or cut gzip file?)") from exc


def _lines(path: Path, f: BinaryIO, line: int) -> Iterator[Call | Bad]:
    for n, text in enumerate(f, start=line):
        text = text.strip()
        if text:
            yield Call(f"{path}:{n}", text)


def _array(path: Path, f: BinaryIO, line: int) -> Iterator[Call | Bad]:
    """Elements of a top-level JSON array, cut with `json.JSONDecoder.raw_decode` from a sliding buffer:
    only the element being read and one chunk of the file are in memory."""
    decoder = json.JSONDecoder()
    text = _Utf8()
    f.read(1)  # the "["
    buf, pos, eof = "", 0, False
    while True:
        pos, line = _skip_separators(buf, pos, line)
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            if pos >= len(buf):
                raise json.JSONDecodeError("Expecting value", buf, pos)
            _, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            if not eof and _maybe_cut(exc, buf):
                if len(buf) - pos > MAX_RECORD_BYTES:
                    yield Bad(f"{path}:{line}", f"a record over {MAX_RECORD_BYTES >> 20} MiB", rest_skipped=True)
                    return
                # At least as much again as the record so far: a record much bigger than a chunk is
                # parsed again a few times, not once per chunk.
                chunk = f.read(max(_CHUNK, len(buf) - pos))
                eof = not chunk
                buf, pos = buf[pos:] + text.decode(chunk, final=eof), 0
                continue
            if eof and (pos >= len(buf) or _maybe_cut(exc, buf)):
                yield Bad(f"{path}:{line}", "the file ends before its JSON array does (cut short?)", rest_skipped=True)
            else:
                at = line + buf.count("\n", pos, min(exc.pos, len(buf)))
                yield Bad(f"{path}:{at}", f"not valid JSON ({exc.msg})", rest_skipped=True)
            return
        yield Call(f"{path}:{line}", buf[pos:end].encode())
        line += buf.count("\n", pos, end)
        pos = end


class _Utf8:
    """Bytes to text across chunk borders (a character may be cut in two)."""

    def __init__(self) -> None:
        self._d = codecs.getincrementaldecoder("utf-8")(errors="strict")

    def decode(self, b: bytes, final: bool = False) -> str:
        return str(self._d.decode(b, final))


def _skip_separators(buf: str, pos: int, line: int) -> tuple[int, int]:
    """Past whitespace and the comma between elements."""
    n = len(buf)
    while pos < n and buf[pos] in " \t\r\n,":
        if buf[pos] == "\n":
            line += 1
        pos += 1
    return pos, line


def _maybe_cut(exc: json.JSONDecodeError, buf: str) -> bool:
    """Whether the error can be the buffer's end cutting a record (more of the file may complete it)."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(buf) - 8


class _Fields(msgspec.Struct):
    """What backfill reads of a call object itself (the rest is forwarded as it is)."""

    call_status: str | None = None
    start_timestamp: int | float | None = None
    end_timestamp: int | float | None = None


_FIELDS = msgspec.json.Decoder(_Fields)


@dataclass
class BackfillStats:
    files: int = 0
    calls: int = 0  # sent (or, in a dry run, that would be)
    not_ended: int = 0
    bad: list[Bad] = field(default_factory=list)
    acknowledged: int = 0
    refused: list[str] = field(default_factory=list)

    def summary(self, topic: str, dry_run: bool) -> str:
        verb = "would send" if dry_run else "sent"
        acked = "" if dry_run else f" (acknowledged by Kafka: {self.acknowledged:,})"
        return (
            f"backfill: {verb} {self.calls:,} calls from {self.files} files to {topic}{acked}; skipped "
            f"{self.not_ended:,} calls not ended yet and {len(self.bad):,} malformed records"
        )


@dataclass(frozen=True, slots=True)
class Event:
    key: str
    body: bytes
    headers: list[tuple[str, str | bytes | None]]


def to_event(call: Call, prefix: str, now_ms: int) -> Event | Bad | None:
    """The `call_analyzed` event of one call object; None for a call not ended yet."""
    try:
        fields = _FIELDS.decode(call.text)
    except msgspec.ValidationError as exc:
        return Bad(call.where, f"not a call object: {exc}")
    except msgspec.DecodeError as exc:
        return Bad(call.where, f"not valid JSON: {exc}")
    if fields.call_status in NOT_ENDED:
        return None
    body = _HEAD + call.text + b"}"
    try:
        r = route(body, prefix)
    except PayloadError as exc:
        return Bad(call.where, str(exc))
    at = str(int(fields.end_timestamp or fields.start_timestamp or now_ms)).encode()
    headers: list[tuple[str, str | bytes | None]] = [
        (Header.EVENT, r.event.encode()),
        (Header.RECEIVED_AT, at),
        (Header.SIGNED_AT, at),
        (Header.BACKFILLED_AT, str(now_ms).encode()),
    ]
    return Event(r.key, body, headers)


class Backfill:
    """Sends the calls of some files to `<prefix>.call_analyzed`, or only counts them (`dry_run`)."""

    def __init__(self, cfg: CommonSettings, dry_run: bool = False, strict: bool = False) -> None:
        self.cfg = cfg
        self.topic = f"{cfg.topic_prefix}.{EventName.CALL_ANALYZED.value}"
        self.dry_run = dry_run
        self.strict = strict
        self.stats = BackfillStats()
        self.now_ms = int(time.time() * 1000)
        self.producer: Producer | None = None

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.stats.acknowledged += 1
        else:
            self.stats.refused.append(f"key {msg.key()!r}: {err.str()}")

    def _send(self, ev: Event) -> None:
        assert self.producer is not None
        while True:
            try:
                self.producer.produce(
                    self.topic, value=ev.body, key=ev.key.encode(), headers=ev.headers, on_delivery=self._delivered
                )
                break
            except BufferError:  # the producer's queue is full: let Kafka take some first
                self.producer.poll(0.5)
        self.producer.poll(0)

    def _one(self, item: Call | Bad, say: Callable[[str], None]) -> None:
        ev = to_event(item, self.cfg.topic_prefix, self.now_ms) if isinstance(item, Call) else item
        if ev is None:
            self.stats.not_ended += 1
        elif isinstance(ev, Bad):
            self.stats.bad.append(ev)
            rest = " with the rest of this file (a JSON array cannot be resumed after it)" if ev.rest_skipped else ""
            if self.strict:
                raise BackfillError(f"{ev.where}: {ev.reason}; stopped there (--strict): nothing after it was sent")
            say(f"backfill: {ev.where}: {ev.reason}; skipped{rest}")
        else:
            self.stats.calls += 1
            if not self.dry_run:
                self._send(ev)

    def run(
        self, paths: list[Path], progress: Callable[[int], None] = lambda n: None, say: Callable[[str], None] = log.info
    ) -> BackfillStats:
        if not self.dry_run:
            ensure_topics(self.cfg.kafka_bootstrap, self.cfg.topic_prefix, partitions=self.cfg.topic_partitions)
            self.producer = Producer(
                {
                    "bootstrap.servers": self.cfg.kafka_bootstrap,
                    "enable.idempotence": True,
                    "compression.type": "lz4",
                    "linger.ms": 20,
                    # Reading outruns Kafka: a full queue makes produce() wait, which bounds memory.
                    "queue.buffering.max.kbytes": 32768,
                    "client.id": "callstream-backfill",
                }
            )
        try:
            for path in paths:
                self.stats.files += 1
                for item in records(path, progress):
                    self._one(item, say)
        finally:
            self._finish()
        return self.stats

    def _finish(self) -> None:
        if self.producer is None:
            return
        left = self.producer.flush(120)
        if left or self.stats.refused:
            raise BackfillError(
                f"Kafka did not take {left + len(self.stats.refused)} events ({'; '.join(self.stats.refused[:3])}); "
                "run the backfill again: a call sent twice is still loaded and counted once"
            )


def total_bytes(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths if p.is_file())
