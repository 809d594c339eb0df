"""A local S3-compatible object store without Docker, for the lake in development and tests.

The server is S3Proxy (`org.gaul:s3proxy`, Apache-2.0) from Maven Central with its filesystem
backend: buckets are folders under the data folder, and it listens on 127.0.0.1 only. Clients use
the usual `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (`callstream s3 start`
prints them).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from callstream import maven
from callstream.localkafka import _reap, port_open
from kernel.errors import CallstreamError

log = logging.getLogger(__name__)

S3PROXY_VERSION = os.environ.get("CALLSTREAM_S3PROXY_VERSION", "2.6.0")
DEFAULT_PORT = 9000
ACCESS_KEY = "callstream"
SECRET_KEY = "callstream-local-secret"

PROPERTIES = """# Written by `callstream s3 start`; edit the code, not this file.
s3proxy.endpoint=http://{host}:{port}
s3proxy.authorization=aws-v2-or-v4
s3proxy.identity={identity}
s3proxy.credential={credential}
jclouds.provider=filesystem
jclouds.filesystem.basedir={data}
"""

LOGBACK = """<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{logs}/s3proxy.log</file>
    <encoder><pattern>%d %level %logger{{0}} %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="FILE"/></root>
  <logger name="org.gaul.s3proxy" level="INFO"/>
</configuration>
"""


class S3SetupError(CallstreamError):
    """The local S3 server could not be fetched, started or reached."""


def default_home() -> Path:
    """Jars, data and logs: `CALLSTREAM_S3_HOME`, else `.s3proxy/` in the current folder."""
    return Path(os.environ.get("CALLSTREAM_S3_HOME", ".s3proxy")).resolve()


def answers(endpoint: str, timeout: float = 2.0) -> bool:
    """True when an HTTP server answers at `endpoint` (S3 refuses an unsigned request: still an answer)."""
    try:
        httpx.get(endpoint, timeout=timeout)
        return True
    except httpx.HTTPError:
        return False


@dataclass
class LocalS3:
    home: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    jars: Path | None = None
    heap: str = "384m"

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        if self.jars is None:
            cache = os.environ.get("CALLSTREAM_S3_CACHE")
            self.jars = (Path(cache) if cache else self.home / "jars").resolve() / S3PROXY_VERSION

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> Path:
        return self.home / f"s3-{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.state / "s3proxy.pid"

    @property
    def data_dir(self) -> Path:
        return self.state / "data"

    def env(self) -> dict[str, str]:
        """The variables that point an S3 client (and the lake) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            # S3Proxy refuses the CRC checksums newer AWS SDKs add to uploads by default.
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def fetch(self, say: Callable[[str], None] = log.info) -> Path:
        assert self.jars is not None
        text = maven.pom("s3proxy", [f"org.gaul:s3proxy:{S3PROXY_VERSION}"])
        return maven.copy_dependencies(self.jars, text, f"S3Proxy {S3PROXY_VERSION}", S3SetupError, say)

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def running(self) -> bool:
        return port_open(self.host, self.port) and answers(self.endpoint)

    def _write_config(self) -> Path:
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.state / "s3proxy.conf"
        props.write_text(
            PROPERTIES.format(
                host=self.host, port=self.port, identity=self.access_key, credential=self.secret_key, data=self.data_dir
            )
        )
        (self.state / "logback.xml").write_text(LOGBACK.format(logs=self.state / "logs"))
        return props

    def start(self, wait: float = 60.0, say: Callable[[str], None] = log.info) -> float:
        """Start the server unless one answers already; return the seconds until it answered."""
        if self.running():
            say(f"S3 is already running on {self.endpoint}.")
            return 0.0
        if port_open(self.host, self.port):
            raise S3SetupError(f"port {self.host}:{self.port} is taken by something else; pick another with --port")
        started = time.monotonic()
        self.fetch(say)
        props = self._write_config()
        assert self.jars is not None
        cmd = [
            "java",
            f"-Xmx{self.heap}",
            f"-Dlogback.configurationFile={self.state / 'logback.xml'}",
            "-cp",
            str(self.jars / "lib" / "*"),
            "org.gaul.s3proxy.Main",
            "--properties",
            str(props),
        ]
        with open(self.state / "logs" / "stdout.log", "ab") as out:
            try:  # a new session: Ctrl-C in the terminal that started it must not stop it
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
                )
            except FileNotFoundError as exc:
                raise S3SetupError("`java` was not found on PATH; install Java 17 or later") from exc
        self.pid_file.write_text(str(proc.pid))
        say(f"Starting S3Proxy {S3PROXY_VERSION} on {self.endpoint} (pid {proc.pid}) ...")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise S3SetupError(f"S3Proxy exited with code {proc.returncode}; see {self.state / 'logs'}")
            if self.running():
                took = time.monotonic() - started
                say(f"S3 is ready on {self.endpoint} after {took:.1f}s (data: {self.data_dir}).")
                return took
            time.sleep(0.2)
        self.stop()
        raise S3SetupError(f"S3Proxy did not answer on {self.endpoint} within {wait:.0f}s; see {self.state / 'logs'}")

    def stop(self, timeout: float = 20.0, say: Callable[[str], None] = log.info) -> bool:
        """Stop the server this home started; True if one was running."""
        pid = self.pid()
        if pid is None:
            say(f"No S3 server started from {self.home} is running on port {self.port}.")
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.1)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        say("S3 stopped.")
        return True

    def status(self) -> str:
        if self.running():
            pid = self.pid()
            who = f"pid {pid}, started from {self.home}" if pid else "not started from here"
            return f"S3 is running on {self.endpoint} ({who}); data: {self.data_dir}"
        return f"S3 is not running on {self.endpoint}."
