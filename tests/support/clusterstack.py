"""The cluster tests' deployment: three Kafka nodes and the callstream services, each on a host of
its own (`tests.support.network`), and the audit that follows every fault.

`Brokers` is the three-node KRaft cluster (the same `LocalCluster` that `callstream kafka start
--brokers 3` runs), one node per host. `Stack` is one test's services under a topic prefix of its
own: gateways, workers and a sink, each on its own host, an alert webhook in the test process, and
`Spread` traffic through the gateways. `Stack.audit` is the crash tests' audit: every 204 is on its
topic, the worker's totals are exact, the warehouse holds one row per analyzed call with exactly its
child rows (tests.support.audit), every alert once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from callstream.localcluster import Host, LocalCluster
from callstream.localkafka import KAFKA_VERSION, free_port
from callstream.procs import Process
from kernel.catalogue import EventName, all_topics
from kernel.topics import ensure_topics, wait_for_topics
from tests.support.audit import TopicLog, audit, stored_offsets
from tests.support.expected import Stored, read_alerts, read_stored
from tests.support.network import NetHost, Network
from tests.support.paths import KAFKA_JARS
from tests.support.receiver import Receiver
from tests.support.spread import Spread, Tally

SESSION_TIMEOUT_S = 6.0


def say(text: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float, seen: Callable[[], object] = lambda: None) -> float:
    """Poll `check` until true; the seconds it took. AssertionError naming `what` and `seen()` otherwise."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what} within {timeout:.0f}s; seen: {seen()}"
        time.sleep(0.5)
    return time.monotonic() - started


class Brokers:
    """Three KRaft nodes (each broker and controller), one per host."""

    def __init__(self, net: Network, home: Path) -> None:
        self.hosts = [net.add(f"k{i}") for i in (1, 2, 3)]
        node: dict[str, Any] = {"heap": "384m", "jars": KAFKA_JARS / KAFKA_VERSION, "partitions": 3}
        if net.real:
            hosts = [Host(h.address, h.wrapper) for h in self.hosts]
            self.cluster = LocalCluster.on_hosts(home, hosts, **node)
        else:
            ports, controllers = [free_port() for _ in self.hosts], [free_port() for _ in self.hosts]
            self.cluster = LocalCluster.on_ports(home, 3, ports=ports, controller_ports=controllers, **node)

    @property
    def bootstrap(self) -> str:
        return self.cluster.bootstrap

    def host(self, node_id: int) -> NetHost:
        return self.hosts[node_id - 1]

    def leader(self, topic: str, partition: int = 0) -> int:
        """The node leading `partition` of `topic` (a topic just created may take a moment to show)."""
        wait_for_topics(self.bootstrap, [topic], say_every=30)
        meta = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(topic, timeout=10)
        return int(meta.topics[topic].partitions[partition].leader)

    def restore(self) -> None:
        """Every host healed and every node running (after a test that failed half-way)."""
        for h in self.hosts:
            h.heal()
        self.cluster.start(wait=180, say=say)

    def out_of_sync(self, topics: list[str]) -> dict[str, list[int]]:
        """Partitions of `topics` whose in-sync replicas are fewer than their replicas."""
        try:
            meta = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=5)
        except Exception as exc:
            return {"metadata": [], str(exc): []}
        out: dict[str, list[int]] = {}
        for name in topics:
            t = meta.topics.get(name)
            if t is None:
                out[name] = []
                continue
            short = [p for p, pm in t.partitions.items() if len(pm.isrs) < len(pm.replicas)]
            if short:
                out[name] = short
        return out


@dataclass
class Service:
    process: Process
    host: NetHost
    url: str | None = None


@dataclass
class Stack:
    """One test's services under its own topic prefix."""

    net: Network
    brokers: Brokers
    folder: Path
    receiver: Receiver
    prefix: str = field(default_factory=lambda: f"c{uuid.uuid4().hex[:10]}")
    key: str = field(default_factory=lambda: f"k_{uuid.uuid4().hex}")
    gateways: list[Service] = field(default_factory=list)
    workers: list[Service] = field(default_factory=list)
    sink: Service | None = None

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
        return env | {
            "PYTHONUNBUFFERED": "1",
            "CALLSTREAM_KAFKA_BOOTSTRAP": self.brokers.bootstrap,
            "CALLSTREAM_TOPIC_PREFIX": self.prefix,
            "CALLSTREAM_API_KEYS": self.key,
            "CALLSTREAM_ALERT_WEBHOOK_URL": self.receiver.url,
            "CALLSTREAM_WAREHOUSE": str(self.folder / "warehouse.duckdb"),
            "CALLSTREAM_PARQUET_DIR": str(self.folder / "parquet"),
            "CALLSTREAM_DATA_DIR": str(self.folder / name / "faust"),
            "CALLSTREAM_SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
            # The worker serves its API on the host's address, where the test and its peer reach it.
            "CALLSTREAM_DASHBOARD_PUBLIC": "true",
        }

    def _start(self, name: str, args: list[str], url: str | None = None) -> Service:
        host = self.net.add(f"{name}{self.prefix[1:5]}")
        argv = [a.replace("{host}", host.address) for a in args]
        url = url.replace("{host}", host.address) if url else None
        cmd = [sys.executable, "-m", "callstream", *argv]
        proc = host.spawn(name, cmd, self.folder / f"{name}.log", self.env(name), self.folder, url)
        return Service(proc, host, url)

    def start(self, gateways: int = 1, workers: int = 1) -> None:
        ensure_topics(self.brokers.bootstrap, self.prefix, 3)
        for i in range(gateways):
            port = free_port()
            self.gateways.append(
                self._start(
                    f"g{i + 1}", ["gateway", "--host", "{host}", "--port", str(port)], f"http://{{host}}:{port}"
                )
            )
        for i in range(workers):
            port = free_port()
            args = ["worker", "--web-host", "{host}", "--web-port", str(port)]
            self.workers.append(self._start(f"w{i + 1}", args, f"http://{{host}}:{port}"))
        self.sink = self._start("s", ["sink"])
        for g in self.gateways:
            g.process.wait_http("/healthz", timeout=90, ok=lambda r: r.status_code == 200)
        for w in self.workers:
            w.process.wait_http("/readyz", timeout=180, ok=lambda r: r.status_code == 200)
        if workers > 1:
            wait_for(
                "every worker in the group",
                lambda: len(self.metrics(self.workers[0]).get("workers", [])) == workers,
                180,
                lambda: self.metrics(self.workers[0]).get("workers"),
            )

    def traffic(self, seconds: float, rate: float = 500.0, seed: int = 1) -> Spread:
        urls = [g.url for g in self.gateways if g.url]
        return Spread(urls, self.key, rate, seconds, seed).start()

    # -- reading the services -------------------------------------------------------------------

    @staticmethod
    def _get(service: Service, path: str) -> dict[str, Any]:
        try:
            r = httpx.get(f"{service.url}{path}", timeout=5)
            return dict(r.json()) if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}

    def metrics(self, worker: Service) -> dict[str, Any]:
        return self._get(worker, "/api/metrics?minutes=60")

    def counts(self, worker: Service) -> dict[str, Any]:
        return self._get(worker, "/api/counts")

    def sink_rows(self) -> dict[str, int]:
        status = (self.folder / "warehouse.duckdb").with_suffix(".status.json")
        try:
            return dict(orjson.loads(status.read_bytes())["tables"])
        except (OSError, ValueError, KeyError):
            return {}

    def alive(self, *services: Service) -> None:
        for s in services:
            p = s.process
            assert p.alive(), f"{p.name} exited with {p.proc.returncode}:\n{p.output()[-4000:]}"

    def logs(self) -> str:
        every = [*self.gateways, *self.workers, *([self.sink] if self.sink else [])]
        return "\n".join(f"--- {s.process.name}\n{s.process.output()[-3000:]}" for s in every)

    # -- the audit -----------------------------------------------------------------------------

    def audit(self, tally: Tally, survivors: list[Service] | None = None, worker_lost: bool = False) -> Stored:
        """Stop the gateways (the event topics are final then) and check everything against the topics.

        `worker_lost`: a worker died with its host, so an alert POSTed twice is reported, not
        asserted (see `_audit_alerts`).
        """
        workers = survivors if survivors is not None else self.workers
        assert self.sink is not None
        self.alive(*workers, self.sink)
        for g in self.gateways:
            if g.process.alive():
                g.process.stop(signal.SIGTERM, timeout=30)
        lost = set(tally.accepted)
        stored = read_stored(self.brokers.bootstrap, self.prefix, acked=lost)
        assert not lost, f"{len(lost)} of {len(tally.accepted)} bodies answered 204 are not on their topic"
        worker = workers[0]
        want = stored.worker_counts()
        wait_for(
            "the worker counts every stored event once",
            lambda: self.counts(worker).get("events") == want,
            180,
            lambda: _diff(want, self.counts(worker).get("events") or {}),
        )
        overall = self.metrics(worker).get("overall", {})
        assert overall.get("calls") == len(stored.calls), (overall.get("calls"), len(stored.calls))
        self._audit_alerts(stored, worker_lost)
        self._audit_warehouse(stored)
        self.alive(*workers)
        return stored

    def _audit_alerts(self, stored: Stored, worker_lost: bool) -> None:
        """Every per-call alert the stored events owe is on the alerts topic once, and every alert
        there was POSTed, once. Across a lost worker one repost is allowed: the worker that takes
        over its outbox posts what the lost one may have posted in the instant before it died (with
        the same `Idempotency-Key`); that is reported as a warning, not asserted."""
        owed = stored.owed_alerts
        assert owed, "the traffic owed no alert: the alert audit would prove nothing"

        def on_topic() -> Counter[str]:
            log = read_alerts(self.brokers.bootstrap, self.prefix)
            return Counter({a: n for a, n in log.ids.items() if a in log.per_call})

        def posted() -> Counter[str]:
            return Counter(b["alert"]["id"] for b in self.receiver.received() if b["alert"].get("call_id"))

        wait_for("every owed alert", lambda: owed <= set(on_topic()), 120, lambda: owed - set(on_topic()))
        alerts = on_topic()
        assert {a: n for a, n in alerts.items() if n > 1} == {}, f"alerts on the topic more than once: {alerts}"
        wait_for("every alert POSTed", lambda: set(posted()) >= set(alerts), 60, lambda: set(alerts) - set(posted()))
        sent = posted()
        assert set(sent) == set(alerts), f"POSTed but not on the topic: {set(sent) - set(alerts)}"
        twice = {a: n for a, n in sent.items() if n > 1}
        if worker_lost and twice:
            warnings.warn(f"alerts POSTed again by the worker that took over the outbox: {twice}", stacklevel=2)
            return
        assert twice == {}, f"alerts POSTed more than once: {sent}"

    def _audit_warehouse(self, stored: Stored) -> None:
        assert self.sink is not None
        want = {
            "calls": len(stored.lifecycle[EventName.CALL_ANALYZED]),
            "chats": len(stored.lifecycle[EventName.CHAT_ANALYZED]),
        }
        wait_for(
            "the sink loads every analyzed call and chat",
            lambda: {k: self.sink_rows().get(k) for k in want} == want,
            180,
            self.sink_rows,
        )
        code = self.sink.process.stop(signal.SIGTERM, timeout=60)
        assert code == 0, f"the sink exited with {code}:\n{self.sink.process.output()[-3000:]}"
        db = self.folder / "warehouse.duckdb"
        log = TopicLog(self.brokers.bootstrap, self.prefix)
        try:
            problems = audit(db, log)
        finally:
            log.close()
        assert problems == [], problems
        offsets = stored_offsets(db) or {}
        ends = end_offsets(self.brokers.bootstrap, [f"{self.prefix}.{f}" for f in ("call_analyzed", "chat_analyzed")])
        assert {tp: offsets.get(tp, 0) for tp in ends} == ends, "the sink stopped short of the topics' end"

    def in_sync(self, timeout: float = 180.0) -> float:
        """Wait until every partition of the prefix's topics has all its replicas in sync again."""
        names = all_topics(self.prefix)
        lagging = self.brokers.out_of_sync
        return wait_for("every replica back in sync", lambda: not lagging(names), timeout, lambda: lagging(names))

    def stop(self) -> None:
        """Stop every service and take its host away."""
        for s in [*self.gateways, *self.workers, *([self.sink] if self.sink else [])]:
            if s.process.alive():
                s.process.stop(signal.SIGTERM, timeout=20)
            self.net.remove(s.host)


def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """The high watermark of every partition of `topics`."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ends-{uuid.uuid4().hex}"})
    try:
        meta = c.list_topics(timeout=30)
        return {
            (t, p): int(c.get_watermark_offsets(TopicPartition(t, p), timeout=30)[1])
            for t in topics
            for p in meta.topics[t].partitions
        }
    finally:
        c.close()


def _diff(want: dict[str, int], have: dict[str, int]) -> dict[str, tuple[int | None, int | None]]:
    return {k: (want.get(k), have.get(k)) for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)}
