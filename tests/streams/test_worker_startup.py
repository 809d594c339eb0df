"""A real `callstream worker` started as users deploy it: alone, in an empty folder, before its
topics exist or on topics the broker made, and onto a state it cannot use.

Each test starts its own worker process against the session's broker, on its own topic prefix.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic  # type: ignore[attr-defined]

from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import free_port
from callstream.procs import Process, callstream
from kernel.catalogue import all_topics
from kernel.signature import sign
from kernel.topics import partition_counts
from streams.settings import WorkerSettings
from streams.topics import CHANGELOG_CONFIG
from streams.worker import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

StartWorker = Callable[..., Process]


@pytest.fixture
def start_worker(service_env: dict[str, str], tmp_path: Path) -> Iterator[StartWorker]:
    """Start `callstream worker` in `cwd` (default: the test's folder), with `env` changes (None removes)."""
    started: list[Process] = []

    def start(cwd: Path | None = None, env: dict[str, str | None] | None = None) -> Process:
        port = free_port()
        merged: dict[str, str] = {**service_env, "CALLSTREAM_WEB_PORT": str(port)}
        for name, value in (env or {}).items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        workdir = cwd or tmp_path
        workdir.mkdir(parents=True, exist_ok=True)
        log = tmp_path / f"worker-{len(started)}.log"
        proc = callstream("worker", ["worker"], log, merged, cwd=workdir, url=f"http://127.0.0.1:{port}")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(signal.SIGKILL, timeout=10)


def ready(r: httpx.Response) -> bool:
    return r.status_code == 200 and r.text.strip() == "ready"


def create_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, n, 1) for t, n in partitions.items()]).values():
        future.result(timeout=30)


def changelog_of(prefix: str) -> str:
    """The state table's changelog topic, as the worker names it (Faust's naming)."""
    return Worker(WorkerSettings(topic_prefix=prefix, kafka_bootstrap="127.0.0.1:1")).topics.changelog


def exit_output(proc: Process, timeout: float = 90) -> tuple[int, str]:
    """Wait for the worker to exit on its own; its status and its output."""
    try:
        status = proc.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker is still running after {timeout:.0f}s:\n{proc.output()[-3000:]}") from None
    return status, proc.output()


def post_call(gateway: Process, key: str) -> dict[str, int]:
    """One completed call's events through the gateway; the number of each event type sent."""
    sent: dict[str, int] = {}
    with httpx.Client(timeout=15) as client:
        for ev in CallFactory(Fleet(seed=12, agents=1), seed=12, turns=(2, 3)).events("completed"):
            body = ev.body()
            headers = {"x-retell-signature": sign(body, key), "content-type": "application/json"}
            r = client.post(f"{gateway.url}/webhook", content=body, headers=headers)
            assert r.status_code == 204, r.text
            sent[ev.event] = sent.get(ev.event, 0) + 1
    return sent


def wait_counts(worker: Process, want: dict[str, int]) -> dict[str, object]:
    r = worker.wait_http("/api/counts", timeout=90, ok=lambda r: r.status_code == 200 and r.json()["events"] == want)
    body: dict[str, object] = r.json()
    return body


def test_a_fresh_empty_folder_is_enough(topics: str, start_worker: StartWorker, tmp_path: Path) -> None:
    """Finding 1: the default data folder `data/faust` is created, parents included."""
    fresh = tmp_path / "fresh"
    worker = start_worker(cwd=fresh, env={"CALLSTREAM_DATA_DIR": None})
    worker.wait_http("/readyz", timeout=90, ok=ready)
    assert (fresh / "data" / "faust").is_dir()


def test_started_before_its_topics_it_creates_them_and_counts_what_comes(
    kafka_bootstrap: str, prefix: str, api_key: str, start_worker: StartWorker, start_service: Callable[..., Process]
) -> None:
    """Finding 2: no topic exists when the worker starts; it creates them and reads what arrives."""
    worker = start_worker()
    worker.wait_http("/api/metrics", timeout=90, ok=lambda r: r.status_code == 200 and r.json()["complete"])
    worker.wait_http("/readyz", timeout=30, ok=ready)
    counts = partition_counts(AdminClient({"bootstrap.servers": kafka_bootstrap}), all_topics(prefix))
    assert counts[f"{prefix}.call_started"] == counts[f"{prefix}.alerts"] == 3
    port = free_port()
    gateway = start_service("gateway", "gateway", "--port", str(port), url=f"http://127.0.0.1:{port}")
    gateway.wait_http("/healthz")
    sent = post_call(gateway, api_key)
    assert wait_counts(worker, sent)["complete"] is True


def test_it_takes_the_partition_count_of_the_topics_as_they_exist(
    kafka_bootstrap: str, prefix: str, api_key: str, start_worker: StartWorker, gateway_service: Process
) -> None:
    """Finding 2: topics made with another count (say, the broker's default) set the state table's count."""
    create_topics(kafka_bootstrap, {t: 2 for t in all_topics(prefix)})
    worker = start_worker()
    worker.wait_http("/api/metrics", timeout=90, ok=lambda r: r.status_code == 200 and r.json()["complete"])
    worker.wait_http("/readyz", timeout=30, ok=ready)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert partition_counts(admin, [changelog_of(prefix)]) == {changelog_of(prefix): 2}
    sent = post_call(gateway_service, api_key)
    counted = wait_counts(worker, sent)
    assert counted["complete"] is True
    metrics = httpx.get(f"{worker.url}/api/metrics", timeout=10).json()
    assert metrics["partitions"] == [0, 1]


def test_event_topics_with_different_partition_counts_stop_it_with_one_line(
    kafka_bootstrap: str, prefix: str, start_worker: StartWorker
) -> None:
    create_topics(kafka_bootstrap, {t: 2 if t.endswith(".call_ended") else 3 for t in all_topics(prefix)})
    status, out = exit_output(start_worker())
    assert status != 0
    assert "Traceback" not in out
    assert f"2 partitions: {prefix}.call_ended; 3 partitions: {prefix}.call_analyzed" in out.strip().splitlines()[-1]


def test_while_kafka_is_unreachable_it_is_alive_and_says_what_it_waits_for(start_worker: StartWorker) -> None:
    dead = f"127.0.0.1:{free_port()}"
    worker = start_worker(env={"CALLSTREAM_KAFKA_BOOTSTRAP": dead})
    r = worker.wait_http("/readyz", timeout=60, ok=lambda r: r.status_code == 503 and "Kafka" in r.text)
    assert r.text.startswith(f"not ready: waiting for Kafka at {dead}")
    assert httpx.get(f"{worker.url}/healthz", timeout=5).status_code == 200
    assert worker.stop(signal.SIGTERM) == 0  # a supervisor's stop is not a failure


@pytest.mark.parametrize("state", ["undecodable record", "different partition count"])
def test_a_state_it_cannot_recover_stops_it_with_one_line(
    kafka_bootstrap: str, topics: str, start_worker: StartWorker, state: str
) -> None:
    """Finding 3: the worker exits non-zero, so that a supervisor restarts it, instead of never being ready."""
    changelog = changelog_of(topics)
    if state == "undecodable record":
        create_topics(kafka_bootstrap, {changelog: 3})
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(changelog, key=b"p:0", value=b"\xc1 not msgpack", partition=0)
        assert producer.flush(30) == 0
        says = "partition 0 of the state table holds a record it cannot read"
    else:
        create_topics(kafka_bootstrap, {changelog: 2})
        says = f"2 partitions: {changelog}; 3 partitions: the event topics"
    status, out = exit_output(start_worker())
    assert status != 0
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert says in last and changelog in last


def test_an_older_versions_changelog_gets_the_compaction_settings(
    kafka_bootstrap: str, topics: str, start_worker: StartWorker
) -> None:
    """A changelog made before the state had a lifetime (broker-default segments) gets the settings
    that let the log cleaner keep it to live state; a value an operator set on it stays, except a
    cleanup policy that would delete state."""
    changelog = changelog_of(topics)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    made = admin.create_topics([NewTopic(changelog, 3, 1, config={"cleanup.policy": "delete", "segment.ms": "120000"})])
    next(iter(made.values())).result(timeout=30)
    worker = start_worker()
    worker.wait_http("/readyz", timeout=90, ok=ready)
    described = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, changelog)])
    have = {k: v.value for k, v in next(iter(described.values())).result(timeout=15).items()}
    assert {k: have[k] for k in CHANGELOG_CONFIG} == {**CHANGELOG_CONFIG, "segment.ms": "120000"}
    assert f"the state changelog {changelog} now has cleanup.policy=compact, segment.bytes=" in worker.output()
