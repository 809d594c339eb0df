"""A local single-node Apache Kafka (KRaft) without Docker, for development and tests.

The broker is the real Apache Kafka from Maven Central: Maven copies `org.apache.kafka:kafka_2.13`
and its runtime dependencies into a cache folder, `kafka.tools.StorageTool` formats a data folder,
and `kafka.Kafka` runs broker and controller in one JVM. The Maven POM lacks the logging binding
that the release tarball ships, so we add `log4j-slf4j-impl` (Kafka 4 still uses SLF4J 1.7) or
the broker would log nothing.

A node can also be one of several that form a cluster (`callstream.localcluster`): then its
quorum voters, cluster id and replication settings come from the cluster, and it may run under a
command prefix such as `ip netns exec <namespace>` (a host of its own, in the tests).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from callstream.ports import PortInUse, require_free
from kernel.errors import KafkaSetupError
from kernel.settings import CommonSettings

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"  # the default; CALLSTREAM_KAFKA_VERSION picks another
LOG4J_VERSION = "2.24.3"
DOCKER_HINT = "The other way to get a broker is Docker: `docker compose up -d kafka`."
# How often a node tells the controllers it is alive, and how long they wait before they fence a
# silent one (its partitions get new leaders and it leaves their in-sync replicas). Kafka's
# defaults are 2 s and 9 s; a lost node is noticed sooner with these.
HEARTBEAT_MS = 1000
SESSION_MS = 6000

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>callstream.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

LOG4J2 = """Configuration:
  Appenders:
    RollingFile:
      name: FILE
      fileName: "{logs}/server.log"
      filePattern: "{logs}/server.log.%i"
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
      SizeBasedTriggeringPolicy:
        size: 50MB
      DefaultRolloverStrategy:
        max: 3
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: FILE
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: org.apache.kafka.controller
        level: INFO
"""

SERVER_PROPERTIES = """# Written by `callstream kafka start`; edit the code, not this file.
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions={partitions}
auto.create.topics.enable={auto_create}
default.replication.factor={replication}
min.insync.replicas={min_insync}
offsets.topic.replication.factor={replication}
offsets.topic.num.partitions=10
transaction.state.log.replication.factor={replication}
transaction.state.log.min.isr={min_insync}
share.coordinator.state.topic.replication.factor={replication}
share.coordinator.state.topic.min.isr={min_insync}
group.initial.rebalance.delay.ms=0
broker.heartbeat.interval.ms={heartbeat_ms}
broker.session.timeout.ms={session_ms}
log.retention.hours=168
log.segment.bytes=104857600
"""


class LocalKafkaSettings(CommonSettings):
    """Where `callstream kafka` and `up` keep the local broker (environment and `.env`)."""

    # Jars, data and logs; the jars go to <home>/jars unless kafka_cache names another folder.
    kafka_home: Path = Path(".kafka")
    kafka_cache: Path | None = None
    kafka_version: str = KAFKA_VERSION

    def jars(self, home: Path) -> Path:
        """The jar folder of this Kafka version: under kafka_cache, or <home>/jars."""
        return (self.kafka_cache or home / "jars").resolve() / self.kafka_version


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A loopback port free now whose next port is free too: a local node's controller listens on
    port + 1 unless told otherwise, and a port the OS hands out may neighbour a client's connection."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port < 65535:
                with contextlib.suppress(PortInUse):
                    require_free("127.0.0.1", port + 1, "a local broker's controller", "controller_port")
                    return port
    raise KafkaSetupError("no two neighbouring loopback ports are free; stop what holds the ephemeral ports")


def broker_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    """True when a Kafka broker at `bootstrap` answers a metadata request."""
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap.partition(",")[0].rpartition(":")
    if not port_open(host or "127.0.0.1", int(port)):
        return False
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": int(timeout * 1000)})
    try:
        admin.list_topics(timeout=timeout)
        return True
    except Exception:
        return False


@dataclass
class LocalKafka:
    """One local node (broker and controller): its jar cache, its data/log folder and its ports."""

    home: Path
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int | None = None
    partitions: int = 3
    heap: str = "1g"
    jars: Path | None = None
    version: str = KAFKA_VERSION
    # Topics made by the broker on a producer's or consumer's first request, as a stock broker does.
    auto_create: bool = True
    # In a cluster: this node's id, every controller (`id@host:port,...`), the cluster's id (None:
    # a new one when formatting), and the replication of internal and auto-created topics.
    node_id: int = 1
    voters: str | None = None
    cluster_id: str | None = None
    replication: int = 1
    min_insync: int = 1
    # The state folder's name under `home` (default `broker-<port>`), and a command prefix the
    # JVM runs under (e.g. `ip netns exec <namespace>`).
    name: str | None = None
    wrapper: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        if self.controller_port is None:
            self.controller_port = self.port + 1
        if self.jars is None:
            self.jars = (self.home / "jars").resolve() / self.version
        if self.voters is None:
            self.voters = f"{self.node_id}@{self.host}:{self.controller_port}"

    @classmethod
    def configured(cls, port: int | None = None, home: Path | None = None) -> LocalKafka:
        """The broker the settings describe: CALLSTREAM_KAFKA_BOOTSTRAP, _KAFKA_HOME, _CACHE, _VERSION."""
        cfg = LocalKafkaSettings()
        host, configured_port = cfg.first_broker()
        home = (home or cfg.kafka_home).resolve()
        return cls(home=home, host=host, port=port or configured_port, jars=cfg.jars(home), version=cfg.kafka_version)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def state(self) -> Path:
        """Data, logs and pid file of this node."""
        return self.home / (self.name or f"broker-{self.port}")

    @property
    def pid_file(self) -> Path:
        return self.state / "broker.pid"

    @property
    def log_dir(self) -> Path:
        return self.state / "logs"

    @property
    def data_dir(self) -> Path:
        return self.state / "data"

    # -- fetch -------------------------------------------------------------------------------

    def check_tools(self) -> tuple[str, str]:
        """Paths of `java` and `mvn`; a clear error when one is missing (Maven only until the jars are in)."""
        java = shutil.which("java")
        if java is None:
            raise KafkaSetupError(f"`java` was not found on PATH; install Java 17 or later. {DOCKER_HINT}")
        mvn = shutil.which("mvn")
        if mvn is None and not self._jars_ready():
            raise KafkaSetupError(
                f"`mvn` (Apache Maven) was not found on PATH; it fetches the Kafka jars once. {DOCKER_HINT}"
            )
        return java, mvn or "mvn"

    def _jars_ready(self) -> bool:
        assert self.jars is not None
        return (self.jars / ".complete").exists()

    def fetch(self, say: Callable[[str], None] = log.info) -> Path:
        """Copy Kafka and its runtime dependencies from Maven Central into the cache, once."""
        assert self.jars is not None
        if self._jars_ready():
            return self.jars
        _, mvn = self.check_tools()
        say(f"Fetching Apache Kafka {self.version} from Maven Central into {self.jars} (once) ...")
        self.jars.mkdir(parents=True, exist_ok=True)
        pom = self.jars / "pom.xml"
        pom.write_text(POM.format(kafka=self.version, log4j=LOG4J_VERSION))
        started = time.monotonic()
        mvn_log = self.jars / "mvn.log"
        with open(mvn_log, "wb") as out:
            proc = subprocess.run(
                [
                    mvn,
                    "-B",
                    "-f",
                    str(pom),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={self.jars / 'lib'}",
                    "-DincludeScope=runtime",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if proc.returncode != 0:
            raise KafkaSetupError(
                f"Maven could not fetch Apache Kafka {self.version} (exit {proc.returncode}; its output is in "
                f"{mvn_log}): check the network and CALLSTREAM_KAFKA_VERSION. {DOCKER_HINT}"
            )
        (self.jars / ".complete").write_text(self.version)
        say(f"Fetched Kafka {self.version} in {time.monotonic() - started:.1f}s.")
        return self.jars

    # -- lifecycle ---------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The broker's pid if its pid file names a live process."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        _reap(pid)  # a JVM this process started and that was killed is a zombie until reaped
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def running(self) -> bool:
        return broker_answers(self.bootstrap)

    def _java_cmd(self, java: str, main: str, *args: str) -> list[str]:
        assert self.jars is not None
        return [java, "-cp", str(self.jars / "lib" / "*"), main, *args]

    def _write_config(self) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.state / "server.properties"
        props.write_text(
            SERVER_PROPERTIES.format(
                node_id=self.node_id,
                voters=self.voters,
                host=self.host,
                port=self.port,
                controller_port=self.controller_port,
                data=self.data_dir,
                partitions=self.partitions,
                auto_create=str(self.auto_create).lower(),
                replication=self.replication,
                min_insync=self.min_insync,
                heartbeat_ms=HEARTBEAT_MS,
                session_ms=SESSION_MS,
            )
        )
        (self.state / "log4j2.yaml").write_text(LOG4J2.format(logs=self.log_dir))
        return props

    def formatted_cluster_id(self) -> str | None:
        """The cluster id this node's data folder was formatted with, if it was."""
        try:
            text = (self.data_dir / "meta.properties").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

    def _format(self, java: str, props: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = self.cluster_id or new_cluster_id()
        fmt = ("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props))
        format_log = self.log_dir / "storage-format.log"
        with open(format_log, "wb") as out:
            proc = subprocess.run(
                self._java_cmd(java, *fmt),
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if proc.returncode != 0:
            raise KafkaSetupError(
                f"kafka.tools.StorageTool could not format {self.data_dir} (see {format_log}); "
                f"remove {self.state} to start afresh"
            )

    def _check_ports(self) -> None:
        assert self.controller_port is not None
        for p in (self.port, self.controller_port):
            if port_open(self.host, p):
                raise KafkaSetupError(
                    f"port {self.host}:{p} is taken by something that is not a Kafka broker answering on "
                    f"{self.bootstrap}; stop what uses it or pick another port (--port or CALLSTREAM_KAFKA_BOOTSTRAP)."
                )

    def launch(self, say: Callable[[str], None] = log.info) -> subprocess.Popen[bytes]:
        """Fetch, configure and format as needed, and start the JVM; do not wait for it to answer."""
        self._check_ports()
        java, _ = self.check_tools()
        self.fetch(say)
        props = self._write_config()
        self._format(java, props)
        heap = os.environ.get("KAFKA_HEAP_OPTS", f"-Xms256m -Xmx{self.heap}").split()
        cmd = [
            *self.wrapper,
            java,
            *heap,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.state / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={self.log_dir}",
            "-cp",
            str(self.jars / "lib" / "*"),  # type: ignore[operator]
            "kafka.Kafka",
            str(props),
        ]
        with open(self.log_dir / "stdout.log", "ab") as out:
            # A new session: Ctrl-C in the terminal that started it must not kill the broker;
            # `callstream kafka stop` does.
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.pid_file.write_text(str(proc.pid))
        return proc

    def exited(self, proc: subprocess.Popen[bytes]) -> KafkaSetupError | None:
        """The error to raise when the JVM `launch` started has exited already."""
        if proc.poll() is None:
            return None
        return KafkaSetupError(
            f"the Kafka broker {self.bootstrap} exited with code {proc.returncode} while starting; "
            f"see {self.log_dir / 'server.log'} and {self.log_dir / 'stdout.log'}"
        )

    def start(self, wait: float = 90.0, say: Callable[[str], None] = log.info) -> float:
        """Start the broker unless one already answers; return seconds until it answered."""
        if self.running():
            say(f"Kafka is already running on {self.bootstrap}.")
            return 0.0
        started = time.monotonic()
        proc = self.launch(say)
        say(f"Starting Kafka {self.version} on {self.bootstrap} (pid {proc.pid}); waiting for it to answer ...")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            failed = self.exited(proc)
            if failed is not None:
                raise failed
            if broker_answers(self.bootstrap, timeout=1.0):
                took = time.monotonic() - started
                say(f"Kafka is ready on {self.bootstrap} after {took:.1f}s (logs: {self.log_dir}).")
                return took
            time.sleep(0.3)
        self.stop()
        raise KafkaSetupError(
            f"the Kafka broker did not answer on {self.bootstrap} within {wait:.0f}s; see {self.log_dir / 'server.log'}"
        )

    def send_signal(self, sig: int) -> int | None:
        """Send `sig` to the broker this home started; its pid, or None when none runs."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, sig)
        return pid

    def stop(self, timeout: float = 30.0, say: Callable[[str], None] = log.info) -> bool:
        """Stop the broker this home started; True if one was running."""
        pid = self.pid()
        if pid is None:
            say(f"No broker started from {self.home} is running on port {self.port}.")
            return False
        say(f"Stopping Kafka {self.bootstrap} (pid {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        self.wait_gone(pid, timeout, say)
        say(f"Kafka {self.bootstrap} stopped.")
        return True

    def wait_gone(self, pid: int, timeout: float, say: Callable[[str], None] = log.info) -> None:
        """Wait for the JVM `pid` to end after a SIGTERM; kill it when it outlives `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.2)
        if self.pid() is not None:
            say(f"Kafka {self.bootstrap} did not stop within {timeout:.0f}s; killing it.")
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> str:
        pid = self.pid()
        answers = self.running()
        if answers:
            who = f"pid {pid}, started from {self.home}" if pid else "not started from here"
            return f"Kafka is running on {self.bootstrap} ({who}); logs: {self.log_dir}"
        if pid:
            return f"Kafka process {pid} is alive but does not answer on {self.bootstrap}; see {self.log_dir}"
        return f"Kafka is not running on {self.bootstrap}."


def new_cluster_id() -> str:
    """A cluster id in Kafka's form: a UUID as url-safe base64 without padding (StorageTool wants it)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _reap(pid: int) -> None:
    """Collect a child that has exited so it does not linger as a zombie (and look alive)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
