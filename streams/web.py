"""The worker's HTTP face: the live dashboard, the JSON API, Prometheus `/metrics`, health and readiness,
and the login that guards them when the read side has tokens (`streams.readauth`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Any, NamedTuple

import faust
import msgspec
from aiohttp import web as aioweb
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kernel.lag import LagUnavailable, Partition
from streams.alerts import AlertFeed, WebhookSender
from streams.faust_internals import add_web_middleware
from streams.groupview import GroupView
from streams.metrics import ALL, RETENTION_MS, WINDOW_MS, Agg, merge, quantile
from streams.processor import Processor
from streams.readauth import OPEN_PATHS, ReadAccess
from streams.readiness import Readiness

log = logging.getLogger(__name__)

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
    headers: dict[str, str] | None = None


Handler = Callable[..., Awaitable[Reply]]
Lag = Callable[[], Awaitable[dict[Partition, int]]]


def _redirect(to: str, cookie: str | None = None) -> Reply:
    headers = {"Location": to, **({"Set-Cookie": cookie} if cookie else {})}
    return Reply(b"", _TEXT, 303, headers)


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
    """Prometheus view of this worker's partitions (sum over workers in Grafana), its readiness, the
    consumer lag of its partitions and its alert deliveries."""

    def __init__(self, processor: Processor, active: Callable[[], set[int]], readiness: Readiness) -> None:
        self.processor = processor
        self.active = active
        self.readiness = readiness
        self.sender: WebhookSender | None = None
        self.lag: dict[Partition, int] = {}  # set by the scrape before it collects

    def collect(self) -> Iterator[Metric]:
        books = [self.processor.book(p) for p in sorted(self.active())]
        families = _Families()
        for scope in sorted({s for b in books for s in b.totals}):
            families.add("all" if scope == ALL else scope, merge(b.totals[scope] for b in books if scope in b.totals))
        yield from families
        yield GaugeMetricFamily(
            "callstream_worker_ready", "1 once its partitions are assigned and recovered", self.readiness.is_ready
        )
        lag = GaugeMetricFamily(
            "callstream_worker_consumer_lag",
            "Messages of this worker's partitions not yet processed and committed",
            labels=["topic", "partition"],
        )
        for (t, p), n in sorted(self.lag.items()):
            lag.add_metric([t, str(p)], n)
        yield lag
        deliveries = CounterMetricFamily(
            "callstream_alert_deliveries", "Alert deliveries by route and outcome", labels=["route", "outcome"]
        )
        for (route, outcome), n in sorted(self.sender.outcomes.items() if self.sender else ()):
            deliveries.add_metric([route, outcome], n)
        yield deliveries
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
        access: ReadAccess,
        lag: Lag,
        *,
        state: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.view = view
        self.feed = feed
        self.sender = sender
        self.readiness = readiness
        self.access = access
        self.lag = lag
        self.state_of = state
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = _Collector(processor, view.active, readiness)
        self.collector.sender = sender
        self.registry.register(self.collector)

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
            "/login": self.login_page,
            "/logout": self.logout,
        }

    def posts(self) -> dict[str, Handler]:
        return {"/login": self.login}

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
        routes: dict[str, dict[str, int]] = {}
        for (route, outcome), n in sorted(sender.outcomes.items()):
            routes.setdefault(route, {})[outcome] = n
        body = {
            "alerts": self.feed.recent(_int_query(request, "n", 200)),
            "webhook": {"sent": sender.sent, "failed": sender.failed, "dropped": sender.dropped},
            "routes": routes,
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
        try:
            self.collector.lag = await self.lag()
        except LagUnavailable as exc:
            log.warning("/metrics without the consumer lag: %s", exc)
            self.collector.lag = {}
        return Reply(generate_latest(self.registry), "text/plain; version=0.0.4")

    async def healthz(self, request: Request) -> Reply:
        """The process is alive and its event loop answers."""
        return Reply(b"ok\n", _TEXT)

    async def readyz(self, request: Request) -> Reply:
        """200 once the worker's partitions are assigned and recovered and it processes them, else 503 and why."""
        readiness = self.readiness
        return Reply(f"{readiness.describe()}\n".encode(), _TEXT, 200 if readiness.is_ready else 503)

    async def login_page(self, request: Request) -> Reply:
        if not self.access.required:
            return _redirect("/")
        return Reply(_static("login.html"), "text/html")

    async def login(self, request: Request) -> Reply:
        """The login form's POST: a right token sets the cookie and goes to the dashboard."""
        form = await request.post()
        token = str(form.get("token") or "").strip()
        if not self.access.required:
            return _redirect("/")
        if not self.access.valid(token):
            page = _static("login.html").replace(b'id="error" hidden', b'id="error"')
            return Reply(page, "text/html", 401)
        secure = request.url.scheme == "https" or request.headers.get("X-Forwarded-Proto", "") == "https"
        return _redirect("/", self.access.set_cookie(token, secure))

    async def logout(self, request: Request) -> Reply:
        return _redirect("/login", self.access.clear_cookie())


def _wants_page(request: aioweb.Request) -> bool:
    return request.method == "GET" and (
        request.path in ("/", "/dashboard") or "text/html" in request.headers.get("Accept", "")
    )


def _guard(access: ReadAccess) -> Any:
    """The middleware in front of every route: a token or the login cookie, except for OPEN_PATHS."""

    @aioweb.middleware
    async def guard(request: aioweb.Request, handler: Callable[[aioweb.Request], Awaitable[Any]]) -> Any:
        if request.path in OPEN_PATHS or access.allows(
            request.headers.get("Authorization"), request.headers.get("Cookie")
        ):
            return await handler(request)
        if _wants_page(request):
            raise aioweb.HTTPSeeOther("/login")
        return aioweb.json_response(
            {"error": "unauthorized", "detail": "send Authorization: Bearer <one of CALLSTREAM_DASHBOARD_TOKENS>"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="callstream"'},
        )

    return guard


def _view(get: Handler, post: Handler | None = None) -> type[View]:
    class Page(View):
        def _answer(self, reply: Reply) -> Response:
            return self.bytes(reply.body, content_type=reply.content_type, status=reply.status, headers=reply.headers)

        async def get(self, request: Request, **params: Any) -> Response:
            return self._answer(await get(request, **params))

        async def post(self, request: Request, **params: Any) -> Response:
            if post is None:
                return self.bytes(b"method not allowed\n", content_type=_TEXT, status=405)
            return self._answer(await post(request, **params))

    return Page


def register_pages(app: faust.App, pages: Pages) -> None:
    posts = pages.posts()
    for path, handler in pages.routes().items():
        app.page(path, name=f"callstream{path}")(_view(handler, posts.get(path)))
    if pages.access.required:
        add_web_middleware(app, _guard(pages.access))
