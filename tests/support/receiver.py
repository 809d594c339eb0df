"""A webhook receiver on loopback that keeps every JSON body POSTed to it (alerts, in the tests)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson


class Receiver:
    """`with Receiver() as r:` serves on a free loopback port; `r.bodies` holds what arrived.

    `hold()` makes it keep the POSTs that arrive from then on unanswered and unrecorded, as an
    endpoint that hangs does, until `release()` answers them 503 (still unrecorded): what a sender
    killed meanwhile left undelivered. `headers` holds each recorded POST's headers.
    """

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.held = 0  # POSTs that arrived while holding
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                held = not owner._open.is_set()
                if held:
                    with owner._lock:
                        owner.held += 1
                    owner._open.wait()
                else:
                    with owner._lock:
                        owner.bodies.append(orjson.loads(body))
                        owner.headers.append(dict(self.headers.items()))
                try:
                    self.send_response(503 if held else 200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except OSError:  # the sender is gone
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def received(self) -> list[Any]:
        with self._lock:
            return list(self.bodies)

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
