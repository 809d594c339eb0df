"""The FastAPI edge: HTTP in, `Ingest` errors to status codes out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from callstream.catalogue import EVENT_NAMES
from gateway.errors import BodyTooLarge, PayloadError, PublishError, SignatureError, SourceNotAllowed
from gateway.ingest import Ingest
from gateway.metrics import GatewayMetrics
from gateway.producer import EventProducer
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: GatewaySettings | None = None, producer: EventProducer | None = None) -> FastAPI:
    """Build the gateway app; with no arguments it reads `CALLSTREAM_*` (used by `--workers`)."""
    cfg = settings or GatewaySettings()
    metrics = GatewayMetrics()
    state: dict[str, Ingest] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        prod = producer or EventProducer(cfg.kafka_bootstrap, timeout_s=cfg.publish_timeout_s)
        state["ingest"] = Ingest(cfg, prod, metrics)
        if cfg.allow_unsigned and not cfg.keys():
            log.warning("CALLSTREAM_ALLOW_UNSIGNED=true and no API key: signatures are NOT checked")
        log.info(
            "gateway ready: kafka=%s prefix=%s keys=%d", cfg.kafka_bootstrap, cfg.topic_prefix, len(cfg.keys())
        )
        try:
            yield
        finally:
            if producer is None:
                await asyncio.to_thread(prod.close)

    app = FastAPI(
        title="callstream gateway",
        version="0.1.0",
        description="Receives Retell AI / UponAI webhooks and publishes them to Kafka before answering.",
        lifespan=lifespan,
    )

    def fail(status: int, event: str, reason: str, detail: str, **extra: str) -> Response:
        metrics.requests.labels(event, str(status)).inc()
        metrics.rejected.labels(reason).inc()
        log.warning("rejected status=%d reason=%s event=%s detail=%s", status, reason, event or "-", detail)
        return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=extra or None)

    @app.post(
        "/webhook",
        status_code=204,
        responses={
            401: {"description": "missing, malformed, wrongly keyed or stale signature"},
            403: {"description": "source address not allowed"},
            413: {"description": "body over the size limit"},
            422: {"description": "signed, but not a routable event; kept on the dead-letter topic"},
            503: {"description": "Kafka did not acknowledge in time; retry"},
        },
    )
    async def webhook(request: Request) -> Response:
        """Verify the signature and publish the raw body to `<prefix>.<event>`; 204 once Kafka has it."""
        ingest = state["ingest"]
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            source = ingest.source_of(
                request.client.host if request.client else None, request.headers.get("x-forwarded-for")
            )
            try:
                ingest.check_source(source)
                body = await _read_body(request, cfg.max_body_bytes)
                metrics.body_bytes.observe(len(body))
                r = await ingest.accept(body, request.headers.get("x-retell-signature"), source)
            except SourceNotAllowed as exc:
                return fail(403, "", exc.reason, str(exc))
            except BodyTooLarge as exc:
                return fail(413, "", exc.reason, str(exc))
            except SignatureError as exc:
                return fail(401, "", exc.reason, str(exc))
            except PayloadError as exc:
                return fail(422, "", exc.reason, f"{exc}; the body is kept on the dead-letter topic")
            except PublishError as exc:
                return fail(503, "", exc.reason, str(exc), **{"Retry-After": str(cfg.retry_after_s)})
            metrics.requests.labels(r.event if r.known else "unknown", "204").inc()
            return Response(status_code=204)
        finally:
            metrics.in_flight.dec()
            metrics.request_seconds.observe(time.perf_counter() - started)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Kafka answers; 503 when it does not."""
        ok = await asyncio.to_thread(state["ingest"].producer.ready)
        return JSONResponse({"kafka": "ok" if ok else "unreachable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.events = EVENT_NAMES
    return app
