"""The FastAPI edge: HTTP in, `Ingest` errors to status codes out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.ingest import Ingest
from gateway.metrics import GatewayMetrics
from gateway.producer import EventProducer
from gateway.settings import GatewaySettings
from gateway.webhook import Receive, Scope, Send, WebhookHandler, serve_asgi
from kernel.catalogue import EVENT_NAMES

log = logging.getLogger("gateway")

WEBHOOK_PATH = "/webhook"

_WEBHOOK_BODY = {
    "requestBody": {
        "required": True,
        "description": "The webhook body exactly as Retell / UponAI send it; forwarded to Kafka byte for byte.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["event"],
                    "properties": {
                        "event": {
                            "type": "string",
                            "enum": [*EVENT_NAMES],
                            "description": "other values go to <prefix>.unknown",
                        },
                        "call": {
                            "type": "object",
                            "required": ["call_id"],
                            "properties": {"call_id": {"type": "string", "minLength": 1}},
                        },
                        "chat": {
                            "type": "object",
                            "required": ["chat_id"],
                            "properties": {"chat_id": {"type": "string", "minLength": 1}},
                        },
                    },
                    # call_* and transfer_* events carry `call`, chat_* events `chat`; the id keys the message.
                    "anyOf": [{"required": ["call"]}, {"required": ["chat"]}],
                }
            }
        },
    },
    "parameters": [
        {
            "name": "x-retell-signature",
            "in": "header",
            "required": True,
            "description": "v=<unix ms>,d=<hex HMAC-SHA256 of body + timestamp keyed with the API key>",
            "schema": {"type": "string"},
        }
    ],
}


class GatewayApp(FastAPI):
    """FastAPI, except that POST /webhook may be answered before FastAPI's per-request machinery.

    The route stays declared on the app, so /docs and the OpenAPI document describe it truly.
    """

    webhook: WebhookHandler | None = None  # set while the app runs with the fast path on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        h = self.webhook
        if h is not None and scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            await serve_asgi(h, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: GatewaySettings | None = None, producer: EventProducer | None = None) -> GatewayApp:
    """Build the gateway app; with no arguments it reads `CALLSTREAM_*` (used by `--workers`)."""
    cfg = settings or GatewaySettings()
    metrics = GatewayMetrics()
    state: dict[str, WebhookHandler] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        prod = producer or EventProducer(cfg.kafka_bootstrap, timeout_s=cfg.publish_timeout_s)
        state["webhook"] = WebhookHandler(Ingest(cfg, prod, metrics), metrics, cfg.max_body_bytes, cfg.retry_after_s)
        if cfg.webhook_fast_path:
            app.webhook = state["webhook"]
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
        try:
            yield
        finally:
            app.webhook = None
            state.clear()
            if producer is None:
                await asyncio.to_thread(prod.close)

    app = GatewayApp(
        title="callstream gateway",
        version="0.1.0",
        description="Receives Retell AI / UponAI webhooks and publishes them to Kafka before answering.",
        lifespan=lifespan,
    )

    @app.post(
        WEBHOOK_PATH,
        status_code=204,
        response_class=Response,
        openapi_extra=_WEBHOOK_BODY,
        responses={
            204: {"description": "the event is durably in Kafka (acks=all)"},
            401: {"description": "missing, malformed, wrongly keyed or stale signature; nothing stored"},
            403: {"description": "source address not in CALLSTREAM_ALLOWED_SOURCES; nothing stored"},
            413: {"description": "body over the size limit; nothing stored"},
            422: {"description": "signed, but not a routable event; kept on the dead-letter topic"},
            503: {"description": "Kafka did not acknowledge in time; retry (see Retry-After)"},
        },
    )
    async def webhook(request: Request) -> Response:
        """Verify the signature and publish the raw body to `<prefix>.<event>`; 204 once Kafka has it."""
        out = await state["webhook"].handle(
            request.client.host if request.client else None, request.headers.get, request.stream()
        )
        if out.status == 204:
            return Response(status_code=204)
        return Response(out.body, status_code=out.status, headers=dict(out.headers))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Kafka answers; 503 when it does not."""
        ok = await asyncio.to_thread(state["webhook"].ingest.producer.ready)
        return JSONResponse({"kafka": "ok" if ok else "unreachable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.state.events = EVENT_NAMES
    return app
