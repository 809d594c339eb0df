"""The route edge: the only place where an error becomes an HTTP status, and the app's own facts
(its version) come from one place."""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import inspect
import re
from collections.abc import AsyncIterator

import orjson
import pytest

import gateway.errors
from gateway.app import create_app
from gateway.errors import (
    BodyTooLarge,
    GatewayError,
    KafkaUnavailable,
    PayloadError,
    PublishError,
    PublishTimeout,
    SourceNotAllowed,
)
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.webhook import WebhookHandler
from kernel.signature import MissingSignature, SignatureError


class _Refusing:
    """An `Ingest` stand-in that refuses every delivery with one error."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def source_of(self, peer: str | None, _forwarded_for: str | None) -> str | None:
        return peer

    def check_source(self, _source: str | None) -> None:
        return None

    async def accept(self, _body: bytes, _signature: str | None, _source: str | None) -> None:
        raise self.exc


async def _body() -> AsyncIterator[bytes]:
    yield b"{}"


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (SourceNotAllowed("x"), 403),
        (BodyTooLarge("x"), 413),
        (SignatureError("x"), 401),
        (MissingSignature("x"), 401),
        (PayloadError("x"), 422),
        (PublishError("x"), 503),
        (PublishTimeout("x"), 503),
        (KafkaUnavailable("no Kafka broker is reachable"), 503),
    ],
)
def test_each_error_gets_its_status_at_the_edge(exc: Exception, status: int) -> None:
    handler = WebhookHandler(_Refusing(exc), GatewayMetrics(), max_body_bytes=1024, retry_after_s=7)  # type: ignore[arg-type]
    out = asyncio.run(handler.handle("127.0.0.1", {}.get, _body()))
    assert out.status == status
    assert orjson.loads(out.body)["error"] == exc.reason  # type: ignore[attr-defined]
    assert (("retry-after", "7") in out.headers) == (status == 503)


def test_errors_name_what_went_wrong_and_never_a_status() -> None:
    classes = [c for _, c in inspect.getmembers(gateway.errors, inspect.isclass) if issubclass(c, GatewayError)]
    assert KafkaUnavailable in classes
    for cls in classes:
        assert not hasattr(cls, "status"), cls
        assert cls.__dict__.get("__doc__"), f"{cls.__name__} does not say what went wrong"
    tree = ast.parse(inspect.getsource(gateway.errors))
    docs = [ast.get_docstring(n) or "" for n in ast.walk(tree) if isinstance(n, ast.Module | ast.ClassDef)]
    statuses = [d for d in docs if re.search(r"\b[1-5]\d\d\b", d)]
    assert not statuses, f"docstrings that choose a status: {statuses}"


def test_the_version_is_the_distribution_s(monkeypatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9" if name == "callstream" else "?")
    app = create_app(GatewaySettings(_env_file=None, api_keys="k"))  # type: ignore[call-arg, arg-type]
    assert app.version == "9.9.9"
    assert app.openapi()["info"]["version"] == "9.9.9"
