"""Prometheus metrics of the gateway (served on GET /metrics)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Set by `callstream gateway --workers N` (N > 1): every worker writes its samples there and
# /metrics, whichever worker answers it, sums them.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "callstream_gateway_requests",
            "Webhook deliveries by event and status",
            ["event", "status"],
            registry=r,
        )
        self.rejected = Counter("callstream_gateway_rejected", "Deliveries refused, by reason", ["reason"], registry=r)
        self.request_seconds = Histogram(
            "callstream_gateway_request_seconds",
            "Time to answer a webhook delivery",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.produce_seconds = Histogram(
            "callstream_gateway_produce_seconds",
            "Time from produce to Kafka acknowledgement",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.in_flight = Gauge(
            "callstream_gateway_in_flight", "Deliveries being handled now", registry=r, multiprocess_mode="livesum"
        )
        self.body_bytes = Histogram(
            "callstream_gateway_body_bytes",
            "Size of webhook bodies",
            buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576, 10485760),
            registry=r,
        )

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of every worker when several share a folder."""
        if os.environ.get(MULTIPROC_ENV):
            merged = CollectorRegistry()
            # prometheus_client leaves MultiProcessCollector.__init__ unannotated; it registers on `merged`.
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
