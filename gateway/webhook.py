"""POST /webhook as one function of (peer, headers, body chunks) -> outcome, shared by both edges.

The FastAPI route (documented in OpenAPI) and the lean ASGI path (`serve_asgi`, which serves the
same URL without FastAPI's per-request machinery) both call `WebhookHandler.handle`, so the
statuses, metrics and logs are the same whichever edge answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BodyTooLarge, GatewayError, PayloadError, PublishError, SourceNotAllowed
from gateway.ingest import Ingest
from gateway.metrics import GatewayMetrics
from kernel.signature import SignatureError

log = logging.getLogger("gateway")

Refusal = GatewayError | SignatureError

_STATUS: list[tuple[type[Refusal], int]] = [
    (SourceNotAllowed, 403),
    (BodyTooLarge, 413),
    (SignatureError, 401),
    (PayloadError, 422),
    (PublishError, 503),
]


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


NO_CONTENT = Outcome(204)


async def read_limited(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The whole body, refusing early (before reading) when Content-Length is over `limit`."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body is over the {limit}-byte limit")
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class WebhookHandler:
    def __init__(self, ingest: Ingest, metrics: GatewayMetrics, max_body_bytes: int, retry_after_s: int) -> None:
        self.ingest = ingest
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(retry_after_s)

    async def handle(
        self,
        peer: str | None,
        header: Callable[[str], str | None],
        chunks: AsyncIterator[bytes],
    ) -> Outcome:
        """Answer one delivery. `header` looks up a request header by lower-case name."""
        m = self.metrics
        started = time.perf_counter()
        m.in_flight.inc()
        try:
            try:
                source = self.ingest.source_of(peer, header("x-forwarded-for"))
                self.ingest.check_source(source)
                body = await read_limited(chunks, header("content-length"), self.max_body_bytes)
                m.body_bytes.observe(len(body))
                r = await self.ingest.accept(body, header("x-retell-signature"), source)
            except (GatewayError, SignatureError) as exc:
                return self._refuse(exc)
            m.requests.labels(r.event if r.known else "unknown", "204").inc()
            return NO_CONTENT
        finally:
            m.in_flight.dec()
            m.request_seconds.observe(time.perf_counter() - started)

    def _refuse(self, exc: Refusal) -> Outcome:
        status = next((s for cls, s in _STATUS if isinstance(exc, cls)), 500)
        event = getattr(exc, "event", None) or "-"
        detail = str(exc)
        if isinstance(exc, PayloadError):
            detail += "; the body is kept on the dead-letter topic"
        self.metrics.requests.labels(event, str(status)).inc()
        self.metrics.rejected.labels(exc.reason).inc()
        # Exception messages name what is wrong, never the body, the signature or a key.
        log.warning("rejected status=%d reason=%s event=%s detail=%r", status, exc.reason, event, detail)
        headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
        if status == 503:
            headers += (("retry-after", self.retry_after),)
        return Outcome(status, orjson.dumps({"error": exc.reason, "detail": detail}), headers)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def serve_asgi(h: WebhookHandler, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer POST /webhook straight from ASGI messages (the fast path; see `gateway.app.GatewayApp`).

    Same `WebhookHandler` as the FastAPI route; it only skips FastAPI's per-request machinery
    (middleware stack, telemetry checks, routing, request and response objects), which cost more
    than verifying and routing a delivery (bench/RESULTS.md).
    """
    raw: list[tuple[bytes, bytes]] = scope["headers"]

    def header(name: str) -> str | None:
        b = name.encode()
        for k, v in raw:
            if k == b:
                return v.decode("latin-1")
        return None

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            if body:
                yield body
            if not msg.get("more_body", False):
                return

    client = scope.get("client")
    out = await h.handle(client[0] if client else None, header, chunks())
    headers = [(k.encode(), v.encode()) for k, v in out.headers]
    if out.status != 204:  # RFC 9110: no Content-Length on a 204
        headers.append((b"content-length", str(len(out.body)).encode()))
    await send({"type": "http.response.start", "status": out.status, "headers": headers})
    await send({"type": "http.response.body", "body": out.body})
