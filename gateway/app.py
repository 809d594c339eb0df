"""The FastAPI edge: the app, its lifespan (the producer and the handler), and its routes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.ingest import Ingest
from gateway.metrics import GatewayMetrics
from gateway.openapi import WEBHOOK_REQUEST, WEBHOOK_RESPONSES
from gateway.producer import EventProducer
from gateway.settings import GatewaySettings
from gateway.webhook import Receive, Scope, Send, WebhookHandler, serve_asgi
from kernel.catalogue import EVENT_NAMES

log = logging.getLogger("gateway")

WEBHOOK_PATH = "/webhook"


class GatewayApp(FastAPI):
    """FastAPI, except that POST /webhook may be answered before FastAPI's per-request machinery.

    The route stays declared on the app, so /docs and the OpenAPI document describe it truly.
    """

    handler: WebhookHandler | None = None  # set while the app runs
    webhook: WebhookHandler | None = None  # the same handler, while the app runs with the fast path on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        h = self.webhook
        if h is not None and scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await serve_asgi(h, scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def running(self) -> WebhookHandler:
        if self.handler is None:
            raise RuntimeError("the gateway app is not running (its lifespan has not started)")
        return self.handler


def create_app(settings: GatewaySettings | None = None, producer: EventProducer | None = None) -> GatewayApp:
    """Build the gateway app; with no arguments it reads `CALLSTREAM_*` (used by `--workers`).

    A `producer` passed in is the caller's to close; without one, the app makes its own.
    """
    cfg = settings or GatewaySettings()
    metrics = GatewayMetrics()
    app = GatewayApp(
        title="callstream gateway",
        version=importlib.metadata.version("callstream"),
        description="Receives Retell AI / UponAI webhooks and publishes them to Kafka before answering.",
        lifespan=_lifespan(cfg, metrics, producer),
    )
    _add_webhook_route(app)
    _add_probes(app, metrics)
    app.state.events = EVENT_NAMES
    return app


def _lifespan(
    cfg: GatewaySettings, metrics: GatewayMetrics, producer: EventProducer | None
) -> Callable[[GatewayApp], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: GatewayApp) -> AsyncIterator[None]:
        prod = producer or EventProducer(cfg.kafka_bootstrap, timeout_s=cfg.publish_timeout_s)
        app.handler = WebhookHandler(Ingest(cfg, prod, metrics), metrics, cfg.max_body_bytes, cfg.retry_after_s)
        if cfg.webhook_fast_path:
            app.webhook = app.handler
        _log_start(cfg)
        try:
            yield
        finally:
            app.webhook = app.handler = None
            if producer is None:
                await asyncio.to_thread(prod.close)

    return lifespan


def _log_start(cfg: GatewaySettings) -> None:
    if cfg.allow_unsigned and not cfg.keys():
        log.warning("CALLSTREAM_ALLOW_UNSIGNED=true and no API key: signatures are NOT checked")
    log.info(
        "gateway ready: kafka=%s prefix=%s keys=%d allowlist=%d trusted_proxies=%d fast_path=%s",
        cfg.kafka_bootstrap,
        cfg.topic_prefix,
        len(cfg.keys()),
        len(cfg.allowed_source_list()),
        len(cfg.trusted_proxy_list()),
        cfg.webhook_fast_path,
    )


def _add_webhook_route(app: GatewayApp) -> None:
    @app.post(
        WEBHOOK_PATH,
        status_code=204,
        response_class=Response,
        openapi_extra=WEBHOOK_REQUEST,
        responses=WEBHOOK_RESPONSES,
    )
    async def webhook(request: Request) -> Response:
        """Verify the signature and publish the raw body to `<prefix>.<event>`; 204 once Kafka has it."""
        out = await app.running().handle(
            request.client.host if request.client else None, request.headers.get, request.stream()
        )
        if out.status == 204:
            return Response(status_code=204)
        return Response(out.body, status_code=out.status, headers=dict(out.headers))


def _add_probes(app: GatewayApp, metrics: GatewayMetrics) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Kafka answers; 503 and the reason when deliveries would fail now."""
        reason = await asyncio.to_thread(app.running().ingest.producer.unready_reason)
        if reason is None:
            return JSONResponse({"kafka": "ok"})
        return JSONResponse({"kafka": "unreachable", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
