"""The soak's services: its own broker, a gateway with two processes, workers A and B, one sink, and
a webhook receiver for the alerts; started, killed and restarted by role.

The gateway runs `--workers 2` behind one port: SIGKILL of one of its processes is the fault, and
uvicorn's supervisor starts a new one. Its processes are tracked in two slots, so that the RSS table
follows "gateway #1" across its replacements while "gateway #2" lives the whole run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from callstream.localkafka import KAFKA_VERSION, LocalKafka, free_port
from callstream.procs import Process, callstream, spawn
from kernel.catalogue import ANALYZED, EventName, topic
from kernel.topics import ensure_topics
from streams.settings import WorkerSettings
from tests.support.paths import KAFKA_JARS
from tests.support.receiver import Receiver
from warehouse.settings import SinkSettings
from warehouse.status import status_path

WORKERS = ("worker A", "worker B")
SERVICES = ("gateway", *WORKERS, "sink")

SOAK_TTL_ANALYZED_S = 300
SOAK_TTL_IDLE_S = 600


def _children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def gateway_processes(master: int) -> list[int]:
    """The uvicorn worker processes under the gateway's supervisor (not multiprocessing's resource tracker)."""
    return sorted(p for p in _children(master) if "spawn_main" in _cmdline(p))


@dataclass
class Stack:
    """Everything the soak runs, on a topic prefix and a broker of its own, in `work`."""

    work: Path
    prefix: str = field(default_factory=lambda: f"soak{uuid.uuid4().hex[:10]}")
    key: str = field(default_factory=lambda: f"key_{uuid.uuid4().hex}")
    procs: dict[str, Process] = field(default_factory=dict)
    slots: list[int | None] = field(default_factory=lambda: [None, None])  # the gateway's processes by slot
    expected_exit: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.broker = LocalKafka(
            home=self.work / "kafka",
            port=free_port(),
            controller_port=free_port(),
            heap="768m",
            jars=KAFKA_JARS / KAFKA_VERSION,
        )
        self.receiver = Receiver()
        self.ports = {name: free_port() for name in ("gateway", *WORKERS)}
        self.db = self.work / "warehouse.duckdb"
        self.parquet = self.work / "parquet"
        self.restarts = 0

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def worker_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def status_file(self) -> Path:
        return status_path(str(self.db))

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
        env.update(
            CALLSTREAM_KAFKA_BOOTSTRAP=self.bootstrap,
            CALLSTREAM_TOPIC_PREFIX=self.prefix,
            CALLSTREAM_API_KEYS=self.key,
            CALLSTREAM_WAREHOUSE=str(self.db),
            CALLSTREAM_PARQUET_DIR=str(self.parquet),
            CALLSTREAM_ALERT_WEBHOOK_URL=self.receiver.url,
            CALLSTREAM_DATA_DIR=str(self.work / "faust" / name.replace(" ", "-")),
            # The workers' state lifetimes (6 h and 24 h by default) scaled to the soak's hour, so that
            # their live state is steady after the warm-up and memory growth means a leak.
            CALLSTREAM_CALL_TTL_ANALYZED_S=str(SOAK_TTL_ANALYZED_S),
            CALLSTREAM_CALL_TTL_IDLE_S=str(SOAK_TTL_IDLE_S),
            PYTHONUNBUFFERED="1",
        )
        return env

    # -- groups and topics, for the lag --------------------------------------------------------

    # The services run with the defaults and our variables only (see `env`): so do these, whatever
    # this shell's environment or .env say.
    def worker_group(self) -> str:
        return f"{WorkerSettings.model_construct().app_id}-{self.prefix}"

    def sink_group(self) -> str:
        return SinkSettings.model_construct(topic_prefix=self.prefix).consumer_group()

    def event_topics(self) -> list[str]:
        return [topic(self.prefix, e) for e in EventName]

    def analyzed_topics(self) -> list[str]:
        return [topic(self.prefix, e) for e in ANALYZED.values()]

    # -- starting -------------------------------------------------------------------------------

    def start_broker(self) -> float:
        return self.broker.start(wait=180)

    def start(self, name: str) -> Process:
        """Start (or start again) one of SERVICES."""
        log = self.work / "logs" / f"{name.replace(' ', '-')}.log"
        if name == "gateway":
            args = ["gateway", "--port", str(self.ports[name]), "--workers", "2"]
            url: str | None = self.gateway_url
        elif name in WORKERS:
            args, url = ["worker", "--web-port", str(self.ports[name])], self.worker_url(name)
        else:
            args, url = ["sink"], None
        with self.lock:
            if name in self.procs:
                self.restarts += 1
            proc = callstream(name, args, log, self.env(name), cwd=self.work, url=url)
            self.procs[name] = proc
            self.expected_exit.discard(name)
        return proc

    def start_all(self) -> None:
        self.receiver.__enter__()
        self.start_broker()
        ensure_topics(self.bootstrap, self.prefix, partitions=self.broker.partitions)
        for name in SERVICES:
            self.start(name)
        self.procs["gateway"].wait_http("/readyz", timeout=120, ok=lambda r: r.status_code == 200)
        for name in WORKERS:
            self.procs[name].wait_http("/readyz", timeout=300, ok=lambda r: r.status_code == 200)
        self.wait_sink_status(since=0.0, timeout=300)
        self.gateway_slots()

    def wait_sink_status(self, since: float, timeout: float) -> float:
        """When the sink's status file was written after `since` (wall clock)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                at = self.status_file.stat().st_mtime
                if at > since:
                    return at
            except OSError:
                pass
            sink = self.procs["sink"]
            if not sink.alive() and "sink" not in self.expected_exit:
                raise RuntimeError(f"the sink exited with {sink.proc.returncode}; see {sink.log}")
            time.sleep(0.2)
        raise RuntimeError(f"the sink wrote no status in {timeout:.0f}s; see {self.procs['sink'].log}")

    # -- the gateway's processes ----------------------------------------------------------------

    def gateway_slots(self) -> list[int | None]:
        """The gateway's processes by slot: a replacement takes the slot of the process that went."""
        with self.lock:
            now = gateway_processes(self.procs["gateway"].pid)
            kept = [p if p in now else None for p in self.slots]
            new = [p for p in now if p not in kept]
            for i, pid in enumerate(kept):
                if pid is None and new:
                    kept[i] = new.pop(0)
            self.slots = kept
            return list(kept)

    def gateway_started(self) -> int:
        """How many gateway processes have said they started serving so far."""
        return self.procs["gateway"].output().count("Application startup complete")

    # -- faults ---------------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """SIGKILL one of SERVICES and wait until it is gone."""
        with self.lock:
            self.expected_exit.add(name)
            proc = self.procs[name]
        proc.stop(signal.SIGKILL, timeout=30)

    def kill_gateway_process(self, slot: int = 0) -> int:
        pid = self.gateway_slots()[slot]
        if pid is None:
            raise RuntimeError(f"the gateway has no process in slot {slot + 1}")
        os.kill(pid, signal.SIGKILL)
        return pid

    # -- what it looks like now -------------------------------------------------------------------

    def pids(self, simulator: Process | None) -> dict[str, int | None]:
        """Every role's process now, for the RSS log."""
        with self.lock:
            out: dict[str, int | None] = {"gateway (supervisor)": self.procs["gateway"].pid}
            for i, pid in enumerate(self.gateway_slots()):
                out[f"gateway #{i + 1}"] = pid
            for name in (*WORKERS, "sink"):
                proc = self.procs[name]
                out[name] = proc.pid if proc.alive() else None
        out["broker (JVM)"] = self.broker.pid()
        if simulator is not None and simulator.alive():
            out["simulator"] = simulator.pid
        return out

    def ready(self, name: str) -> bool:
        proc = self.procs[name]
        try:
            return httpx.get(f"{proc.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    # -- stopping --------------------------------------------------------------------------------

    def stop(self, *names: str, timeout: float = 60) -> None:
        """SIGTERM to each of `names` at once, then wait for each (SIGKILL after `timeout`)."""
        with self.lock:
            self.expected_exit.update(names)
            procs = [self.procs[n] for n in names if n in self.procs]
        for proc in procs:
            if proc.alive():
                proc.proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop(signal.SIGTERM, timeout=timeout)

    def stop_all(self) -> None:
        self.stop(*SERVICES, timeout=30)
        self.broker.stop()
        self.receiver.__exit__(None, None, None)


def simulator(stack: Stack, seconds: float, rate: float, record: Path, seed: int, processes: int) -> Process:
    """`callstream simulate` for `seconds` at `rate`, keeping the acknowledgement record."""
    cmd = [
        sys.executable,
        "-m",
        "callstream",
        "simulate",
        "--url",
        f"{stack.gateway_url}/webhook",
        "--duration",
        str(seconds),
        "--rate",
        str(rate),
        "--seed",
        str(seed),
        "--processes",
        str(processes),
        "--concurrency",
        "128",
        "--record",
        str(record),
        "--no-progress",
    ]
    return spawn("simulator", cmd, stack.work / "logs" / "simulator.log", stack.env("simulator"), cwd=stack.work)
