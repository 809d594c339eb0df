"""The worker's HTTP face: the live dashboard, the JSON API and Prometheus `/metrics`."""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import faust
import msgspec
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from streams.alerts import AlertFeed, WebhookSender
from streams.groupview import GroupView
from streams.metrics import ALL, RETENTION_MS, WINDOW_MS, Agg, merge, quantile
from streams.processor import Processor

_STATIC = {
    "uPlot.iife.min.js": "application/javascript",
    "uPlot.min.css": "text/css",
    "dashboard.js": "application/javascript",
    "uPlot.LICENSE": "text/plain",
    "dashboard.html": "text/html",
}
_json = msgspec.json.Encoder()


def _static(name: str) -> bytes:
    return resources.files("streams").joinpath("static", name).read_bytes()


def _since(request: Request, default_minutes: int) -> int:
    try:
        minutes = int(request.query.get("minutes", default_minutes))
    except ValueError:
        minutes = default_minutes
    now = int(time.time() * 1000)
    return max(now - now % WINDOW_MS - (minutes - 1) * WINDOW_MS, now - RETENTION_MS)


class _Collector:
    """Prometheus view of this worker's partitions (sum over workers in Grafana)."""

    def __init__(self, processor: Processor, active: Any) -> None:
        self.processor = processor
        self.active = active

    def collect(self) -> Any:
        books = [self.processor.book(p) for p in sorted(self.active())]
        scopes = sorted({s for b in books for s in b.totals})
        calls = CounterMetricFamily(
            "callstream_calls", "Calls by agent and what happened to them", labels=["agent", "kind"]
        )
        reasons = CounterMetricFamily(
            "callstream_disconnections", "Calls by disconnection reason", labels=["agent", "reason"]
        )
        sentiment = CounterMetricFamily(
            "callstream_sentiment", "Analyzed calls by user sentiment", labels=["agent", "sentiment"]
        )
        cost = CounterMetricFamily("callstream_cost", "Total combined call cost", labels=["agent"])
        active = GaugeMetricFamily("callstream_active_calls", "Calls started and not ended", labels=["agent"])
        dur = GaugeMetricFamily(
            "callstream_call_duration_ms", "Call duration percentiles", labels=["agent", "quantile"]
        )
        lat = GaugeMetricFamily(
            "callstream_e2e_latency_p50_ms", "Median of the calls' own e2e latency p50", labels=["agent"]
        )
        for s in scopes:
            agg: Agg = merge(b.totals[s] for b in books if s in b.totals)
            agent = "all" if s == ALL else s
            for k, v in sorted(agg.c.items()):
                if k.startswith("reason:"):
                    reasons.add_metric([agent, k[7:]], v)
                elif k.startswith("sentiment:"):
                    sentiment.add_metric([agent, k[10:]], v)
                elif k == "active_calls":
                    active.add_metric([agent], v)
                elif not k.startswith("event:"):
                    calls.add_metric([agent, k], v)
            cost.add_metric([agent], agg.cost)
            for q in (0.5, 0.95):
                qv = quantile(agg.dur, q)
                if qv is not None:
                    dur.add_metric([agent, str(q)], qv)
            p = quantile(agg.lat, 0.5)
            if p is not None:
                lat.add_metric([agent], p)
        yield from (calls, reasons, sentiment, cost, active, dur, lat)


def register_pages(
    app: faust.App, view: GroupView, feed: AlertFeed, sender: WebhookSender, processor: Processor
) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(processor, view.active))

    @app.page("/")
    class Index(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(_static("dashboard.html"), content_type="text/html")

    @app.page("/dashboard")
    class Dashboard(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(_static("dashboard.html"), content_type="text/html")

    @app.page("/static/{name}")
    class Static(View):
        async def get(self, request: Request, name: str) -> Response:
            if name not in _STATIC:
                return self.error(404, f"no static file {name}")
            return self.bytes(_static(name), content_type=_STATIC[name])

    @app.page("/api/metrics")
    class Metrics(View):
        """Totals and 1-minute windows (last `minutes`, default 60), overall and per agent, for the group."""

        async def get(self, request: Request) -> Response:
            snap = await view.snapshot(_since(request, 60))
            snap["alerts"] = feed.recent(int(request.query.get("alerts", 50)))
            snap["generated_at"] = int(time.time() * 1000)
            return self.bytes(_json.encode(snap), content_type="application/json")

    @app.page("/api/local")
    class Local(View):
        """This worker's own partitions (what the group view asks its peers for)."""

        async def get(self, request: Request) -> Response:
            since = int(request.query.get("since", 0))
            return self.bytes(_json.encode(view.local(since)), content_type="application/json")

    @app.page("/api/alerts")
    class Alerts(View):
        async def get(self, request: Request) -> Response:
            body = {
                "alerts": feed.recent(int(request.query.get("n", 200))),
                "webhook": {"sent": sender.sent, "failed": sender.failed, "dropped": sender.dropped},
            }
            return self.bytes(_json.encode(body), content_type="application/json")

    @app.page("/api/counts")
    class Counts(View):
        """Distinct events counted, per event type and per agent (duplicates never count)."""

        async def get(self, request: Request) -> Response:
            snap = await view.snapshot(_since(request, 1))
            agents = {a: s["events"] for a, s in snap["agents"].items()}
            return self.bytes(
                _json.encode({"events": snap["overall"]["events"], "agents": agents, "complete": snap["complete"]}),
                content_type="application/json",
            )

    @app.page("/metrics")
    class Prometheus(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")
