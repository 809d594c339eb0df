"""docker-compose.yml, run without Docker: each service's `command` and `environment` as a local
`callstream` process, in its own fresh working folder, in several start orders, against a fresh
broker configured as the compose `kafka` service is (auto-creation on, its partition count) and no
topics created up front.

In every order every event the gateway accepted is counted once by the worker, every analyzed call
and chat is a row in DuckDB, and one alert is POSTed per failed dial. A service that exits, a
command the CLI refuses, or a variable no callstream setting reads fails the test. Compose's
`restart: on-failure` is not played: a service that needs a restart to come up has not started
alone. This keeps the compose file from drifting from the CLI.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest

from callstream.config import known_variables
from callstream.fakecalls import CallFactory, Event, Fleet
from callstream.localkafka import KAFKA_VERSION, LocalKafka, free_port
from callstream.procs import Process, spawn
from kernel.signature import sign
from tests.support import compose
from tests.support.paths import KAFKA_JARS
from tests.support.receiver import Receiver

CALLS = 60  # about 280 events per order
FAILED_DIALS = 5
CHATS = 4


DASHBOARD_TOKEN = "compose-dashboard-token-0123456789"


def _shell(prefix: str = "retell", key: str = "k", hook: str = "") -> dict[str, str]:
    """The shell environment `docker compose up` would see."""
    return {
        "CALLSTREAM_TOPIC_PREFIX": prefix,
        "CALLSTREAM_API_KEYS": key,
        "CALLSTREAM_ALERT_WEBHOOK_URL": hook,
        "CALLSTREAM_DASHBOARD_TOKENS": DASHBOARD_TOKEN,
    }


def _ours(spec: dict[str, Any]) -> list[str]:
    """The services that run the callstream image."""
    return [name for name, svc in spec["services"].items() if "build" in svc]


# -- the compose file itself ---------------------------------------------------------------------


def test_interpolation_as_compose_does_it() -> None:
    shell = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET:-d}": "v",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${UNSET-d}": "d",
        "${UNSET:-}": "",
        "a-${SET}-$SET-$$": "a-v-v-$",
    }
    assert {text: compose.interpolate(text, shell) for text in cases} == cases
    with pytest.raises(ValueError, match="needed"):
        compose.interpolate("${EMPTY:?needed}", shell)


def test_every_callstream_service_runs_the_images_entrypoint_with_known_variables() -> None:
    spec = compose.load(_shell())
    assert compose.entrypoint() == ["callstream"]
    ours = _ours(spec)
    assert {"gateway", "worker", "sink"} <= set(ours)
    known = known_variables()
    unknown = {
        f"{name}: {var}"
        for name in ours
        for var in spec["services"][name].get("environment") or {}
        if var.startswith(("CALLSTREAM_", "RETELL_")) and var not in known
    }
    assert unknown == set(), "docker-compose.yml sets variables that no callstream setting reads"


@pytest.mark.parametrize(
    "shell, refused",
    [({}, True), ({"CALLSTREAM_DASHBOARD_TOKENS": "t1,t2"}, False), ({"CALLSTREAM_DASHBOARD_PUBLIC": "true"}, False)],
)
def test_the_compose_worker_serves_its_read_side_on_0000_only_with_tokens(shell: dict[str, str], refused: bool) -> None:
    """In its container the worker listens on 0.0.0.0: without tokens (or PUBLIC on purpose) it must refuse."""
    from streams.errors import ReadSideError
    from streams.readauth import check_bind
    from streams.settings import WorkerSettings

    svc = compose.load(shell)["services"]["worker"]
    host = svc["command"][svc["command"].index("--web-host") + 1]
    env = {
        k.removeprefix("CALLSTREAM_").lower(): v for k, v in svc["environment"].items() if k.startswith("CALLSTREAM_")
    }
    cfg = WorkerSettings.model_validate({**env, "web_host": host})
    assert host == "0.0.0.0"
    if refused:
        with pytest.raises(ReadSideError, match="CALLSTREAM_DASHBOARD_TOKENS"):
            check_bind(cfg.web_host, cfg.dashboard_token_list(), cfg.dashboard_public)
    else:
        check_bind(cfg.web_host, cfg.dashboard_token_list(), cfg.dashboard_public)


def test_the_dockerfile_installs_the_lock_first_copies_every_package_and_runs_as_a_user() -> None:
    lines = [line.strip() for line in compose.DOCKERFILE.read_text().splitlines()]
    steps = [line for line in lines if line and not line.startswith("#")]
    copies = " ".join(line for line in steps if line.startswith("COPY"))
    for package in ("kernel", "gateway", "streams", "warehouse", "callstream"):
        assert f"COPY {package} " in copies, f"the image lacks {package}/"
    first_source = next(i for i, line in enumerate(steps) if line.startswith("COPY kernel"))
    lock_install = next(i for i, line in enumerate(steps) if "pip install" in line and "requirements.lock" in line)
    assert lock_install < first_source, "the dependencies' layer must come before the source"
    users = [line.split()[1] for line in steps if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert not [line for line in steps if line.startswith("ENV") and "CALLSTREAM_" in line]


# -- running it ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh broker with the compose `kafka` service's settings that matter here."""
    env = compose.load(_shell())["services"]["kafka"]["environment"]
    auto_create = str(env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true")).lower() == "true"
    assert auto_create, "the deployment orders rely on the broker's auto-creation"
    k = LocalKafka(
        home=tmp_path_factory.mktemp("compose-kafka"),
        port=free_port(),
        controller_port=free_port(),
        heap="512m",
        jars=KAFKA_JARS / KAFKA_VERSION,
        partitions=int(env.get("KAFKA_NUM_PARTITIONS", 1)),
        auto_create=auto_create,
    )
    k.start(wait=120)
    try:
        yield k.bootstrap
    finally:
        k.stop()


@dataclass
class Traffic:
    """What the test sent and what the gateway accepted."""

    calls: list[list[Event]]
    failed_dials: set[str]
    accepted: dict[tuple[str, str, bytes], Event] = field(default_factory=dict)

    @classmethod
    def make(cls, seed: int) -> Traffic:
        factory = CallFactory(Fleet(seed=seed, agents=3), seed=seed, turns=(2, 4))
        # At least a few failed dials and chats, the rest in the simulator's mix.
        scenarios = ["failed_dial"] * FAILED_DIALS + ["chat"] * CHATS
        scenarios += [factory.scenario() for _ in range(CALLS - len(scenarios))]
        calls = [factory.events(s) for s in scenarios]
        return cls(calls, {events[0].key for s, events in zip(scenarios, calls, strict=True) if s == "failed_dial"})

    def of(self, event: str) -> set[str]:
        return {e.key for e in self.accepted.values() if e.event == event}


def _deliver(client: httpx.Client, url: str, key: str, ev: Event) -> None:
    """One delivery as the platform makes it: retried on 503 and on a refused connection."""
    body = ev.body()
    deadline = time.monotonic() + 60
    while True:
        try:
            r = client.post(url, content=body, headers={"x-retell-signature": sign(body, key)})
            if r.status_code == 204:
                return
            assert r.status_code == 503, f"{ev.event} {ev.key}: HTTP {r.status_code} {r.text}"
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the gateway did not accept {ev.event} {ev.key} within 60 s"
        time.sleep(0.2)


@dataclass
class Stack:
    """One start order's services, from the compose file, on a fresh topic prefix."""

    deployment: compose.Deployment
    key: str
    traffic: Traffic
    procs: dict[str, Process] = field(default_factory=dict)
    services: dict[str, compose.Service] = field(default_factory=dict)

    def start(self, name: str) -> None:
        svc = self.deployment.service(name, lambda cmd: [sys.executable, "-m", *cmd])
        env = {"PATH": os.environ["PATH"], "HOME": str(svc.folder), "PYTHONUNBUFFERED": "1", **svc.env}
        url = svc.url(next(iter(svc.ports))) if svc.ports else None
        self.services[name] = svc
        self.procs[name] = spawn(name, svc.args, svc.folder / f"{name}.log", env, cwd=svc.folder, url=url)

    def alive(self) -> None:
        for name, p in self.procs.items():
            assert p.alive(), f"{name} exited with {p.proc.returncode}:\n{p.output()[-4000:]}"

    def wait(
        self, what: str, check: Callable[[], bool], timeout: float = 120.0, seen: Callable[[], object] = str
    ) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            self.alive()
            assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s; seen: {seen()}; logs:\n{self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()[-2500:]}" for n, p in self.procs.items())

    def send(self) -> None:
        url = f"{self.procs['gateway'].url}/webhook"
        with httpx.Client(timeout=10) as client:
            for n, events in enumerate(self.traffic.calls):
                for ev in events:
                    _deliver(client, url, self.key, ev)
                    self.traffic.accepted[(ev.event, ev.key, ev.body())] = ev
                    if n % 10 == 0:  # the platform retries now and then: a second delivery
                        _deliver(client, url, self.key, ev)

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop(signal.SIGTERM, timeout=20)


def _counts(worker: Process) -> dict[str, Any]:
    try:
        r = httpx.get(f"{worker.url}/api/counts", headers={"Authorization": f"Bearer {DASHBOARD_TOKEN}"}, timeout=5)
        return r.json() if r.status_code == 200 else {}  # type: ignore[no-any-return]
    except httpx.HTTPError:
        return {}


def _rows(warehouse: Path) -> dict[str, int]:
    status = warehouse.with_suffix(".status.json")
    try:
        return dict(orjson.loads(status.read_bytes())["tables"])
    except (OSError, ValueError, KeyError):
        return {}


# Each order: what is started, waited for or sent, one step after the other.
ORDERS: dict[str, list[str]] = {
    "worker first": ["start worker", "ready worker", "start sink", "start gateway", "healthy gateway", "send"],
    "sink first": ["start sink", "settle sink", "start worker", "start gateway", "healthy gateway", "send"],
    "gateway first, traffic before the others": [
        "start gateway",
        "healthy gateway",
        "send",
        "start worker",
        "start sink",
    ],
    "all at once": ["start gateway", "start worker", "start sink", "healthy gateway", "send"],
}


def _step(stack: Stack, step: str) -> None:
    verb, _, name = step.partition(" ")
    if verb == "start":
        stack.start(name)
    elif verb == "ready":
        stack.procs[name].wait_http("/readyz", timeout=120, ok=lambda r: r.status_code == 200)
    elif verb == "healthy":
        stack.procs[name].wait_http("/healthz", timeout=60, ok=lambda r: r.status_code == 200)
    elif verb == "settle":  # a few seconds alone, long enough to find its topics missing
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stack.alive()
            time.sleep(0.2)
    else:
        assert verb == "send", step
        stack.send()


def _check(stack: Stack, hook: Receiver) -> None:
    traffic = stack.traffic
    want = dict(Counter(ev.event for ev in traffic.accepted.values()))
    worker = stack.procs["worker"]
    stack.wait(
        "the worker counts every accepted event once",
        lambda: _counts(worker).get("events") == want,
        seen=lambda: (want, _counts(worker)),
    )
    warehouse = Path(stack.services["sink"].env["CALLSTREAM_WAREHOUSE"])
    calls, chats = traffic.of("call_analyzed"), traffic.of("chat_analyzed")
    stack.wait(
        "the sink loads every analyzed call and chat",
        lambda: (_rows(warehouse).get("calls"), _rows(warehouse).get("chats")) == (len(calls), len(chats)),
    )
    failed = traffic.failed_dials
    assert failed <= traffic.of("call_analyzed") and len(failed) >= FAILED_DIALS

    def dial_alerts() -> Counter[str]:
        return Counter(b["alert"]["call_id"] for b in hook.received() if b["alert"]["rule"] == "failed_dial")

    stack.wait(
        "an alert for every failed dial",
        lambda: set(dial_alerts()) == failed,
        timeout=60,
        seen=lambda: (sorted(failed), Counter(b["alert"]["rule"] for b in hook.received()), dial_alerts()),
    )
    stack.alive()
    sink = stack.procs["sink"]
    assert sink.stop() == 0, sink.output()[-3000:]
    with duckdb.connect(str(warehouse), read_only=True) as con:
        assert {r[0] for r in con.execute("SELECT call_id FROM calls").fetchall()} == calls
        assert {r[0] for r in con.execute("SELECT chat_id FROM chats").fetchall()} == chats
    assert dict(dial_alerts()) == dict.fromkeys(failed, 1), "one alert per failed dial"
    for name, p in stack.procs.items():
        assert "is not a callstream setting" not in p.output(), f"{name}: {p.output()[-2000:]}"
        assert "Traceback" not in p.output(), f"{name}: {p.output()[-4000:]}"


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_compose_services_start_in_any_order_and_every_event_arrives(order: str, broker: str, tmp_path: Path) -> None:
    key = f"k_{uuid.uuid4().hex}"
    with Receiver() as hook:
        spec = compose.load(_shell(prefix=f"d{uuid.uuid4().hex[:10]}", key=key, hook=hook.url))
        # The compose `kafka` service is the broker; its name in the compose network is this machine's broker.
        stack = Stack(compose.Deployment(spec, tmp_path, brokers={"kafka": broker}), key, Traffic.make(seed=7))
        try:
            for step in ORDERS[order]:
                _step(stack, step)
            _check(stack, hook)
        finally:
            stack.stop()
