"""The sink's Prometheus endpoint: its consumer lag per partition and what it loaded.

Off unless `CALLSTREAM_SINK_METRICS_PORT` is set. The lag is asked of Kafka at every scrape: the
offsets the sink commits to its consumer group after each DuckDB commit against each partition's
end, so a sink that is stuck shows a growing lag rather than its last good number.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kernel.catalogue import topic
from kernel.lag import GroupLag, LagUnavailable
from warehouse.errors import WarehouseError
from warehouse.schema import FAMILIES
from warehouse.settings import SinkSettings

log = logging.getLogger(__name__)


class Loaded(Protocol):
    """What the sink counts (`warehouse.sink.SinkStats`)."""

    batches: int
    records: int
    rows: int
    dead_letters: int


class SinkCollector:
    def __init__(self, settings: SinkSettings, loaded: Callable[[], Loaded]) -> None:
        self.topics = [topic(settings.topic_prefix, f.topic_suffix) for f in FAMILIES]
        self.lag = GroupLag(settings.kafka_bootstrap, settings.consumer_group())
        self.loaded = loaded

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "callstream_sink_consumer_lag",
            "Messages not yet loaded and committed, per partition",
            labels=["topic", "partition"],
        )
        try:
            for (t, p), n in sorted(self.lag.query(self.lag.partitions(self.topics)).items()):
                lag.add_metric([t, str(p)], n)
        except LagUnavailable as exc:
            log.warning("sink /metrics without the consumer lag: %s", exc)
        yield lag
        stats = self.loaded()
        for name, value, text in (
            ("callstream_sink_records", stats.records, "Records read and loaded (or dead-lettered)"),
            ("callstream_sink_rows", stats.rows, "Rows written to the warehouse tables"),
            ("callstream_sink_dead_letters", stats.dead_letters, "Records sent to the dead-letter topic"),
            ("callstream_sink_batches", stats.batches, "Batches committed"),
        ):
            yield CounterMetricFamily(name, text, value)


@contextmanager
def sink_metrics(settings: SinkSettings, loaded: Callable[[], Loaded]) -> Iterator[None]:
    """Serve GET /metrics on CALLSTREAM_SINK_METRICS_HOST:PORT while the block runs (nothing when unset)."""
    port = settings.sink_metrics_port
    if port is None:
        yield
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SinkCollector(settings, loaded))
    host = settings.sink_metrics_host
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise WarehouseError(
            f"cannot serve the sink's metrics on {host}:{port} ({exc}); set CALLSTREAM_SINK_METRICS_PORT to a free port"
        ) from exc
    log.info("sink: Prometheus metrics on http://%s:%d/metrics", host, port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
