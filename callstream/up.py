"""`callstream up`: the whole stack on one machine, for a first run.

Everything `up` starts, it stops: on Ctrl-C, SIGTERM or SIGHUP, when a service dies, and when its
own output has gone away (`make up | tee up.log` and Ctrl-C kill `tee` first). Printing then fails
with a broken pipe, so every line goes through `_tell`, which goes quiet instead of raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
import orjson
from pydantic import SecretStr

from callstream.localkafka import LocalKafka, broker_answers
from callstream.ports import require_free
from callstream.procs import Process
from callstream.procs import callstream as start_callstream
from callstream.simulate import SimulationPlan
from callstream.simulate import run as simulate
from kernel.catalogue import EventName
from kernel.errors import CallstreamError
from kernel.settings import CommonSettings
from kernel.topics import ensure_topics

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # here, so that a broken pipe shows now and not at exit


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals(handler: Callable[[int, FrameType | None], None] | int) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class Stack:
    calls: int = 300
    rate: float = 100.0
    gateway_port: int = 8000
    web_port: int = 6066
    log_level: str = "INFO"
    seed: int | None = None  # None: a fresh seed, so that every run sends new calls
    say: Callable[[str], None] = _print
    procs: dict[str, Process] = field(default_factory=dict)
    kafka: LocalKafka | None = None
    read_headers: dict[str, str] = field(default_factory=dict)  # the worker's token, when it has some

    def _tell(self, line: str) -> None:
        try:
            self.say(line)
        except (BrokenPipeError, ValueError, OSError):
            # Our reader is gone. Point stdout at /dev/null, so that the flush at exit cannot fail
            # either, and carry on: the shutdown must still run to its end.
            self.say = lambda _line: None
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    # -- before anything starts ------------------------------------------------------------------

    def _preflight(self) -> tuple[dict[str, str], str]:
        """Check every service's settings, the alert rules and routes and the ports before starting anything;
        return the services' environment and the API key the simulator signs with."""
        from gateway.settings import GatewaySettings
        from streams.alertroutes import routing
        from streams.alertrules import load_config
        from streams.readauth import check_bind
        from streams.settings import WorkerSettings
        from warehouse.settings import SinkSettings

        env = dict(os.environ)
        keys = GatewaySettings(allow_unsigned=True).keys()
        if keys:
            key = keys[0].decode()
        else:
            key = "local-" + secrets.token_hex(16)
            env["CALLSTREAM_API_KEYS"] = key
            self._tell(
                "No CALLSTREAM_API_KEYS or RETELL_API_KEY: made a local key for this run's gateway and simulator."
            )
        GatewaySettings(api_keys=SecretStr(key))
        worker = WorkerSettings(web_port=self.web_port)
        check_bind(worker.web_host, worker.dashboard_token_list(), worker.dashboard_public)
        routing(load_config(worker.alerts_config), worker)
        tokens = worker.dashboard_token_list()
        self.read_headers = {"Authorization": f"Bearer {tokens[0]}"} if tokens else {}
        SinkSettings()
        require_free("127.0.0.1", self.gateway_port, "the gateway", "--gateway-port")
        require_free("127.0.0.1", self.web_port, "the worker's dashboard", "--web-port")
        env.update(CALLSTREAM_WEB_PORT=str(self.web_port), CALLSTREAM_LOG_LEVEL=self.log_level)
        return env, key

    # -- running ---------------------------------------------------------------------------------

    def run(self, wait_forever: bool = True) -> None:
        env, key = self._preflight()
        logs = Path("data/logs")
        logs.mkdir(parents=True, exist_ok=True)
        try:
            with _signals(_interrupt):
                self._start(env, logs)
                self._tell(
                    f"Gateway, worker and sink are up (logs in {logs.resolve()}). Sending {self.calls} calls ..."
                )
                seed = {} if self.seed is None else {"seed": self.seed}
                plan = SimulationPlan(calls=self.calls, rate=self.rate, **seed)
                self._tell(f"Simulator seed {plan.seed} (`callstream up --seed {plan.seed}` repeats these calls).")
                res = asyncio.run(simulate(f"http://127.0.0.1:{self.gateway_port}/webhook", key, plan))
                self._tell(res.summary())
                # Each call has one call_analyzed event, so this counts the calls the sink must load.
                self._summary(res.statuses.get(204, 0), res.accepted_by_event[EventName.CALL_ANALYZED])
                if wait_forever:
                    self._watch(logs)
        except KeyboardInterrupt:
            self._tell("\nStopping ...")
        finally:
            with _signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the clean-up short
                self.shutdown()

    def _start(self, env: dict[str, str], logs: Path) -> None:
        common = CommonSettings()
        if broker_answers(common.kafka_bootstrap):
            self._tell(f"Using the Kafka broker already running on {common.kafka_bootstrap}.")
        else:
            self.kafka = LocalKafka.configured()
            self.kafka.start(say=self._tell)
        ensure_topics(
            common.kafka_bootstrap, common.topic_prefix, common.topic_partitions, replication=common.replication()
        )
        gateway_url, worker_url = f"http://127.0.0.1:{self.gateway_port}", f"http://127.0.0.1:{self.web_port}"
        self._spawn("gateway", ["gateway", "--port", str(self.gateway_port)], env, logs, gateway_url)
        self._spawn("worker", ["worker", "--web-port", str(self.web_port)], env, logs, worker_url)
        self._spawn("sink", ["sink"], env, logs)
        self.procs["gateway"].wait_http("/healthz")
        self.procs["worker"].wait_http("/api/counts", timeout=120)

    def _spawn(self, name: str, args: list[str], env: dict[str, str], logs: Path, url: str | None = None) -> None:
        self.procs[name] = start_callstream(name, args, logs / f"{name}.log", env, url=url)

    def _watch(self, logs: Path) -> None:
        self._tell("Everything keeps running; press Ctrl-C to stop it all.")
        while all(p.alive() for p in self.procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in self.procs.items() if not p.alive()]
        raise CallstreamError(f"{', '.join(dead)} stopped unexpectedly; see {logs.resolve()}")

    def _counts(self, status: Path) -> tuple[int, int]:
        """(rows in `calls` per the sink's status file, events counted by the worker)."""
        rows = 0
        if status.exists():
            rows = int(orjson.loads(status.read_bytes())["tables"].get("calls", 0))
        try:
            counted = sum(
                httpx.get(f"http://127.0.0.1:{self.web_port}/api/counts", headers=self.read_headers, timeout=5)
                .json()["events"]
                .values()
            )
        except (httpx.HTTPError, ValueError, KeyError):
            counted = 0
        return rows, counted

    def _summary(self, accepted: int, analyzed_calls: int) -> None:
        from warehouse.settings import SinkSettings
        from warehouse.status import status_path

        sink = SinkSettings()
        status = status_path(sink.warehouse)
        # Wait, at most 30 s, until the sink has a row for every analyzed call the gateway accepted and
        # the worker's count holds still. Equal readings alone are not enough: the sink rewrites its
        # status at most once a second, so two readings a second apart can both miss a commit.
        last, deadline = (-1, -1), time.monotonic() + 30
        while time.monotonic() < deadline:
            now = self._counts(status)
            if now == last and now[0] >= analyzed_calls:
                break
            last = now
            time.sleep(1.0)
        rows, counted = last
        self._tell(
            "\nSummary\n"
            f"  events accepted by the gateway: {accepted}\n"
            f"  events counted by the worker:   {counted}\n"
            f"  rows in `calls`:                {rows} (DuckDB file: {Path(sink.warehouse).resolve()})\n"
            f"  dashboard:                      http://127.0.0.1:{self.web_port}/\n"
            f"  gateway:                        http://127.0.0.1:{self.gateway_port}/docs\n"
        )

    # -- stopping --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the services, then the broker if `up` started it; each step runs whatever the one before did."""
        try:
            for p in self.procs.values():
                if p.alive():
                    p.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            for name, p in self.procs.items():
                try:
                    p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._tell(f"{name} did not stop in time; killing it.")
                    p.proc.kill()
                    p.proc.wait()
        finally:
            if self.kafka is not None and self.kafka.pid() is not None:
                self.kafka.stop(say=self._tell)
