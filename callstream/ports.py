"""Checking that a port can be listened on before starting a server on it, so that a port in use is
one line naming the option to change, not a server's traceback or a child's exit after Kafka started."""

from __future__ import annotations

import socket

from kernel.errors import CallstreamError


class PortInUse(CallstreamError):
    """Something else listens on the port (or the address is not this machine's)."""


def require_free(host: str, port: int, what: str, option: str) -> None:
    """Raise PortInUse unless `host:port` can be bound now; `option` is how the user picks another."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            # As the servers bind: a port in TIME_WAIT is free for them.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        raise PortInUse(
            f"{what} cannot listen on {host}:{port} ({exc.strerror or exc}); "
            f"stop what uses it or pick another port with {option}"
        ) from exc
