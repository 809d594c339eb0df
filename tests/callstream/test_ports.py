"""A port in use is found before a server starts, and named with the option that picks another."""

from __future__ import annotations

import socket

import pytest

from callstream.localkafka import free_port
from callstream.ports import PortInUse, require_free


def test_a_free_port_passes() -> None:
    require_free("127.0.0.1", free_port(), "the gateway", "--port")


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
