"""The worker's HTTP face: the live dashboard, the JSON API, Prometheus `/metrics`, health and readiness."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Any, NamedTuple

import faust
import msgspec
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streams.alerts import AlertFeed, WebhookSender
from streams.groupview import GroupView
from streams.metrics import ALL, RETENTION_MS, WINDOW_MS, Agg, merge, quantile
from streams.processor import Processor
from streams.readiness import Readiness

_STATIC = {
    "uPlot.iife.min.js": "application/javascript",
    "uPlot.min.css": "text/css",
    "dashboard.js": "application/javascript",
    "uPlot.LICENSE": "text/plain",
    "dashboard.html": "text/html",
}
_json = msgspec.json.Encoder()
_TEXT = "text/plain"


class Reply(NamedTuple):
    body: bytes
    content_type: str = "application/json"
    status: int = 200


Handler = Callable[..., Awaitable[Reply]]


def _static(name: str) -> bytes:
    return resources.files("streams").joinpath("static", name).read_bytes()


def _int_query(request: Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        return default


def _since(request: Request, default_minutes: int) -> int:
    minutes = _int_query(request, "minutes", default_minutes)
    now = int(time.time() * 1000)
    return max(now - now % WINDOW_MS - (minutes - 1) * WINDOW_MS, now - RETENTION_MS)


class _Families:
    """The Prometheus metric families of one scrape."""

    def __init__(self) -> None:
        self.calls = CounterMetricFamily(
            "callstream_calls", "Calls by agent and what happened to them", labels=["agent", "kind"]
        )
        self.reasons = CounterMetricFamily(
            "callstream_disconnections", "Calls by disconnection reason", labels=["agent", "reason"]
        )
        self.sentiment = CounterMetricFamily(
            "callstream_sentiment", "Analyzed calls by user sentiment", labels=["agent", "sentiment"]
        )
        self.cost = CounterMetricFamily("callstream_cost", "Total combined call cost", labels=["agent"])
        self.active = GaugeMetricFamily("callstream_active_calls", "Calls started and not ended", labels=["agent"])
        self.duration = GaugeMetricFamily(
            "callstream_call_duration_ms", "Call duration percentiles", labels=["agent", "quantile"]
        )
        self.latency = GaugeMetricFamily(
            "callstream_e2e_latency_p50_ms", "Median of the calls' own e2e latency p50", labels=["agent"]
        )
        self.late = CounterMetricFamily(
            "callstream_late_events",
            "Deliveries for a call whose state may have been dropped: counted here, not in the totals",
            labels=["agent"],
        )

    def add(self, agent: str, agg: Agg) -> None:
        for name, n in sorted(agg.counts.items()):
            if name.startswith("reason:"):
                self.reasons.add_metric([agent, name.removeprefix("reason:")], n)
            elif name.startswith("sentiment:"):
                self.sentiment.add_metric([agent, name.removeprefix("sentiment:")], n)
            elif name == "active_calls":
                self.active.add_metric([agent], n)
            elif name == "late_events":
                self.late.add_metric([agent], n)
            elif not name.startswith("event:"):
                self.calls.add_metric([agent, name], n)
        self.cost.add_metric([agent], agg.cost)
        for q in (0.5, 0.95):
            value = quantile(agg.duration_buckets, q)
            if value is not None:
                self.duration.add_metric([agent, str(q)], value)
        p50 = quantile(agg.latency_buckets, 0.5)
        if p50 is not None:
            self.latency.add_metric([agent], p50)

    def __iter__(self) -> Iterator[Metric]:
        yield from (
            self.calls,
            self.reasons,
            self.sentiment,
            self.cost,
            self.active,
            self.duration,
            self.latency,
            self.late,
        )


class _Collector:
    """Prometheus view of this worker's partitions (sum over workers in Grafana)."""

    def __init__(self, processor: Processor, active: Callable[[], set[int]]) -> None:
        self.processor = processor
        self.active = active

    def collect(self) -> Iterator[Metric]:
        books = [self.processor.book(p) for p in sorted(self.active())]
        families = _Families()
        for scope in sorted({s for b in books for s in b.totals}):
            families.add("all" if scope == ALL else scope, merge(b.totals[scope] for b in books if scope in b.totals))
        yield from families
        state = GaugeMetricFamily(
            "callstream_state_keys", "Live keys in the worker's state, by partition", labels=["partition", "kind"]
        )
        for p in sorted(self.active()):
            stats = self.processor.stats(p)
            state.add_metric([str(p), "calls"], stats.calls)
            state.add_metric([str(p), "windows"], stats.windows)
        yield state


class Pages:
    """What each route answers; `register_pages` puts them on the Faust app's web server."""

    def __init__(
        self,
        view: GroupView,
        feed: AlertFeed,
        sender: WebhookSender,
        processor: Processor,
        readiness: Readiness,
        *,
        state: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.view = view
        self.feed = feed
        self.sender = sender
        self.readiness = readiness
        self.state_of = state
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(processor, view.active))

    def routes(self) -> dict[str, Handler]:
        return {
            "/": self.dashboard,
            "/dashboard": self.dashboard,
            "/static/{name}": self.static,
            "/api/metrics": self.metrics,
            "/api/local": self.local,
            "/api/alerts": self.alerts,
            "/api/counts": self.counts,
            "/api/state": self.state,
            "/metrics": self.prometheus,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }

    async def dashboard(self, request: Request) -> Reply:
        return Reply(_static("dashboard.html"), "text/html")

    async def static(self, request: Request, name: str) -> Reply:
        if name not in _STATIC:
            return Reply(f"no static file {name}".encode(), _TEXT, 404)
        return Reply(_static(name), _STATIC[name])

    async def metrics(self, request: Request) -> Reply:
        """Totals and 1-minute windows (last `minutes`, default 60), overall and per agent, for the group."""
        snap = await self.view.snapshot(_since(request, 60))
        snap["alerts"] = self.feed.recent(_int_query(request, "alerts", 50))
        snap["generated_at"] = int(time.time() * 1000)
        return Reply(_json.encode(snap))

    async def local(self, request: Request) -> Reply:
        """This worker's own partitions (what the group view asks its peers for)."""
        return Reply(_json.encode(self.view.local(_int_query(request, "since", 0))))

    async def alerts(self, request: Request) -> Reply:
        sender = self.sender
        body = {
            "alerts": self.feed.recent(_int_query(request, "n", 200)),
            "webhook": {"sent": sender.sent, "failed": sender.failed, "dropped": sender.dropped},
        }
        return Reply(_json.encode(body))

    async def counts(self, request: Request) -> Reply:
        """Distinct events counted, per event type and per agent (duplicates never count)."""
        snap = await self.view.snapshot(_since(request, 1))
        agents = {a: s["events"] for a, s in snap["agents"].items()}
        return Reply(
            _json.encode({"events": snap["overall"]["events"], "agents": agents, "complete": snap["complete"]})
        )

    async def state(self, request: Request) -> Reply:
        """This worker's partitions' live state (calls, windows, clock) and its alert outbox."""
        return Reply(_json.encode(self.state_of()))

    async def prometheus(self, request: Request) -> Reply:
        return Reply(generate_latest(self.registry), "text/plain; version=0.0.4")

    async def healthz(self, request: Request) -> Reply:
        """The process is alive and its event loop answers."""
        return Reply(b"ok\n", _TEXT)

    async def readyz(self, request: Request) -> Reply:
        """200 once the worker's partitions are assigned and recovered and it processes them, else 503 and why."""
        readiness = self.readiness
        return Reply(f"{readiness.describe()}\n".encode(), _TEXT, 200 if readiness.is_ready else 503)


def _view(handler: Handler) -> type[View]:
    class Page(View):
        async def get(self, request: Request, **params: Any) -> Response:
            reply = await handler(request, **params)
            return self.bytes(reply.body, content_type=reply.content_type, status=reply.status)

    return Page


def register_pages(app: faust.App, pages: Pages) -> None:
    for path, handler in pages.routes().items():
        app.page(path, name=f"callstream{path}")(_view(handler))
