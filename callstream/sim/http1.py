"""A lean HTTP/1.1 client for the simulator: pre-built request bytes over keep-alive connections.

A general client (httpx) spends far more CPU per request than the gateway does, so a simulator
built on it measures itself. This one writes bytes made ahead of time and parses only what a
webhook sender needs of the answer: the status, the body's length, and whether to keep the
connection. `Answer.seconds` is the server's response time, from the request written to the
response read; waiting for a connection or for the schedule is not in it.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from kernel.errors import CallstreamError

# uvicorn closes an idle keep-alive connection after 5 s: never reuse one that idled this long.
IDLE_S = 4.0


class BadURL(CallstreamError):
    """The webhook URL is not an http:// or https:// URL."""


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.x."""


class _Stale(Exception):
    """A reused connection was closed by the server before it answered: send again on a new one."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where deliveries go."""

    host: str
    port: int
    path: str
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadURL(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, parts.port or (443 if tls else 80), path, tls)

    def request(self, body: bytes, signature: str | None) -> tuple[bytes, int]:
        """A complete POST of `body` as JSON, and where the body starts in it."""
        host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        sig = f"x-retell-signature: {signature}\r\n" if signature else ""
        head = (
            f"POST {self.path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: callstream-simulate\r\n"
            f"content-type: application/json\r\n{sig}content-length: {len(body)}\r\n\r\n"
        ).encode()
        return head + body, len(head)


@dataclass(slots=True)
class Answer:
    """One request's fate: status 0 when no answer came (connection failed, timeout, garbage)."""

    status: int = 0
    written: float | None = None  # time.monotonic() when the request was written
    seconds: float | None = None  # written -> response read; the timeout when none came in time


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)  # the chunk and its CRLF
        if size == 0:
            return


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return its status and whether the connection may carry another request."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
        raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:40]!r}")
    status = int(status_line[9:12])
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    keep = status_line.startswith(b"HTTP/1.1") and headers.get(b"connection") != b"close"
    if status in (204, 304) or status < 200:
        return status, keep
    if b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding", b"").endswith(b"chunked"):
        await _read_chunked(reader)
    else:  # the body runs to the end of the connection
        await reader.read()
        keep = False
    return status, keep


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Keep-alive connections to one target, opened as needed; the caller bounds how many at once."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if target.tls else None

    async def post(self, request: bytes) -> Answer:
        """Send `request` and read the answer, within the sender's timeout."""
        answer = Answer()
        try:
            async with asyncio.timeout(self.timeout):
                await self._post(request, answer)
        except TimeoutError:
            answer.status = 0
            if answer.written is not None:
                answer.seconds = self.timeout
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ProtocolError):
            answer.status = 0
        return answer

    async def _post(self, request: bytes, answer: Answer) -> None:
        for fresh in (False, True):  # a fresh connection when a reused one turned out closed
            conn = await self._connection(fresh)
            try:
                answer.written = time.monotonic()
                answer.status, keep = await _exchange(conn, request)
                answer.seconds = time.monotonic() - answer.written
            except _Stale:
                conn.close()
                continue
            except BaseException:
                conn.close()
                raise
            self._release(conn, keep)
            return

    async def _connection(self, fresh: bool) -> _Connection:
        now = time.monotonic()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if now - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        reader, writer = await asyncio.open_connection(self.target.host, self.target.port, ssl=self._ssl, limit=2**20)
        return _Connection(reader, writer)

    def _release(self, conn: _Connection, keep: bool) -> None:
        if not keep:
            conn.close()
            return
        conn.reused, conn.idle_since = True, time.monotonic()
        self._idle.append(conn)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _exchange(conn: _Connection, request: bytes) -> tuple[int, bool]:
    try:
        conn.writer.write(request)
        await conn.writer.drain()
        return await read_response(conn.reader)
    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
        if conn.reused and not getattr(exc, "partial", b""):
            raise _Stale from exc
        raise
