"""`callstream up`: the whole stack on one machine, for a first run."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from callstream.localkafka import LocalKafka, broker_answers, default_home
from callstream.procs import Process
from callstream.procs import callstream as start_callstream
from callstream.simulate import SimulationPlan
from callstream.simulate import run as simulate
from kernel.errors import CallstreamError
from kernel.settings import CommonSettings
from kernel.topics import ensure_topics


@dataclass
class Stack:
    calls: int = 300
    rate: float = 100.0
    gateway_port: int = 8000
    web_port: int = 6066
    say: Callable[[str], None] = print
    procs: dict[str, Process] = field(default_factory=dict)
    kafka: LocalKafka | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if not (env.get("CALLSTREAM_API_KEYS") or env.get("RETELL_API_KEY")):
            key = "local-" + secrets.token_hex(16)
            env["CALLSTREAM_API_KEYS"] = key
            self.say("No CALLSTREAM_API_KEYS or RETELL_API_KEY: made a local key for this run's gateway and simulator.")
        env.setdefault("CALLSTREAM_WEB_PORT", str(self.web_port))
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str], logs: Path, url: str | None = None) -> None:
        self.procs[name] = start_callstream(name, args, logs / f"{name}.log", env, url=url)

    def run(self, wait_forever: bool = True) -> None:
        common = CommonSettings()
        env = self._env()
        logs = Path("data/logs")
        logs.mkdir(parents=True, exist_ok=True)
        try:
            if broker_answers(common.kafka_bootstrap):
                self.say(f"Using the Kafka broker already running on {common.kafka_bootstrap}.")
            else:
                host, _, port = common.kafka_bootstrap.split(",")[0].rpartition(":")
                self.kafka = LocalKafka(home=default_home(), host=host or "127.0.0.1", port=int(port))
                self.kafka.start(say=self.say)
            ensure_topics(common.kafka_bootstrap, common.topic_prefix, common.topic_partitions)
            self._spawn(
                "gateway",
                ["gateway", "--port", str(self.gateway_port)],
                env,
                logs,
                f"http://127.0.0.1:{self.gateway_port}",
            )
            self._spawn(
                "worker", ["worker", "--web-port", str(self.web_port)], env, logs, f"http://127.0.0.1:{self.web_port}"
            )
            self._spawn("sink", ["sink"], env, logs)
            self.procs["gateway"].wait_http("/healthz")
            self.procs["worker"].wait_http("/api/counts", timeout=120)
            self.say(f"Gateway, worker and sink are up (logs in {logs.resolve()}). Sending {self.calls} calls ...")
            key = env["CALLSTREAM_API_KEYS" if env.get("CALLSTREAM_API_KEYS") else "RETELL_API_KEY"].split(",")[0]
            plan = SimulationPlan(calls=self.calls, rate=self.rate)  # a fresh seed: every run sends new calls
            self.say(f"Simulator seed {plan.seed} (`callstream simulate --seed {plan.seed}` repeats these calls).")
            res = asyncio.run(simulate(f"http://127.0.0.1:{self.gateway_port}/webhook", key, plan))
            self.say(res.summary())
            # Each call has one call_analyzed event, so this counts the calls the sink must load.
            self._summary(res.statuses.get(204, 0), res.accepted_by_event["call_analyzed"])
            if wait_forever:
                self.say("Everything keeps running; press Ctrl-C to stop it all.")
                while all(p.alive() for p in self.procs.values()):
                    time.sleep(0.5)
                dead = [n for n, p in self.procs.items() if not p.alive()]
                raise CallstreamError(f"{', '.join(dead)} stopped unexpectedly; see {logs.resolve()}")
        except KeyboardInterrupt:
            self.say("\nStopping ...")
        finally:
            self.shutdown()

    def _counts(self, status: Path) -> tuple[int, int]:
        """(rows in `calls` per the sink's status file, events counted by the worker)."""
        rows = 0
        if status.exists():
            rows = int(orjson.loads(status.read_bytes())["tables"].get("calls", 0))
        try:
            counted = sum(
                httpx.get(f"http://127.0.0.1:{self.web_port}/api/counts", timeout=5).json()["events"].values()
            )
        except (httpx.HTTPError, ValueError, KeyError):
            counted = 0
        return rows, counted

    def _summary(self, accepted: int, analyzed_calls: int) -> None:
        from warehouse.settings import SinkSettings
        from warehouse.sink import status_path

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
        self.say(
            "\nSummary\n"
            f"  events accepted by the gateway: {accepted}\n"
            f"  events counted by the worker:   {counted}\n"
            f"  rows in `calls`:                {rows} (DuckDB file: {Path(sink.warehouse).resolve()})\n"
            f"  dashboard:                      http://127.0.0.1:{self.web_port}/\n"
            f"  gateway:                        http://127.0.0.1:{self.gateway_port}/docs\n"
        )

    def shutdown(self) -> None:
        for p in self.procs.values():
            if p.alive():
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for name, p in self.procs.items():
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{name} did not stop in time; killing it.")
                p.proc.kill()
                p.proc.wait()
        if self.kafka is not None:
            self.kafka.stop(say=self.say)
