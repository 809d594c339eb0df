"""A port in use is found before a server starts, and named with the option that picks another."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from callstream import localkafka
from callstream.localkafka import free_port
from callstream.ports import PortInUse, require_free


def test_a_free_port_passes() -> None:
    require_free("127.0.0.1", free_port(), "the gateway", "--port")


class _HandedOut:
    """socket.socket() for free_port() whose bind to port 0 gets the given ports, in turn."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = iter(ports)
        self.port = 0

    def __call__(self) -> _HandedOut:
        return self

    def __enter__(self) -> _HandedOut:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        self.port = next(self.ports)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_free_port_has_a_free_neighbour_for_a_brokers_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker started on free_port() binds its controller to the next port: a client socket bound
    there (an outgoing connection's local port can be) made Kafka exit at start."""
    with socket.socket() as neighbour:
        neighbour.bind(("127.0.0.1", 0))
        taken = neighbour.getsockname()[1]
        fine = free_port()
        monkeypatch.setattr(localkafka, "socket", SimpleNamespace(socket=_HandedOut([taken - 1, fine])))
        assert free_port() == fine


def test_a_port_someone_listens_on_is_named_with_the_option() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"the gateway cannot listen on 127.0.0.1:{port} .*--port$"):
            require_free("127.0.0.1", port, "the gateway", "--port")


def test_an_address_that_is_not_this_machines_is_refused() -> None:
    with pytest.raises(PortInUse, match=r"cannot listen on 192\.0\.2\.1"):
        require_free("192.0.2.1", free_port(), "the worker's dashboard", "--web-host")
