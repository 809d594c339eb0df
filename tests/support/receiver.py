"""A webhook receiver on loopback that keeps every JSON body POSTed to it (alerts, in the tests)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson


class Receiver:
    """`with Receiver() as r:` serves on a free loopback port (or a free port of `host`); `r.bodies`
    holds what arrived, `arrived` when each came (wall clock), `headers` each recorded POST's headers.

    `hold()` makes it keep the POSTs that arrive from then on unanswered and unrecorded, as an
    endpoint that hangs does, until `release()` answers them 503 (still unrecorded): what a sender
    killed meanwhile left undelivered.

    It answers `status` (PagerDuty's Events API answers 202), and 503 to the first `fail_first`
    POSTs (those bodies are not kept; `attempts` counts every POST).
    """

    def __init__(self, status: int = 200, fail_first: int = 0, host: str = "127.0.0.1") -> None:
        self.bodies: list[Any] = []
        self.arrived: list[float] = []
        self.attempts = 0
        self.cut_short = 0  # POSTs whose body never arrived whole
        self.headers: list[dict[str, str]] = []
        self.held = 0  # POSTs that arrived while holding
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                if len(body) < length:  # the sender died in the middle (a worker SIGKILLed): nothing arrived
                    with owner._lock:
                        owner.cut_short += 1
                    self.close_connection = True
                    return
                held = not owner._open.is_set()
                with owner._lock:
                    owner.attempts += 1
                    owner.held += held
                    failing = held or owner.attempts <= fail_first
                    if not failing:
                        owner.bodies.append(orjson.loads(body))
                        owner.arrived.append(time.time())
                        owner.headers.append(dict(self.headers.items()))
                if held:
                    owner._open.wait()
                try:
                    self.send_response(503 if failing else status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the sender is gone
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def received(self) -> list[Any]:
        with self._lock:
            return list(self.bodies)

    def deliveries(self) -> list[tuple[float, Any]]:
        """Each recorded body with the wall-clock time it arrived, in order."""
        with self._lock:
            return list(zip(self.arrived, self.bodies, strict=True))

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.set()
        self.server.shutdown()
        self.server.server_close()
