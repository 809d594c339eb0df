"""The source allowlist and X-Forwarded-For (trusted only from our own proxies)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.errors import SourceNotAllowed
from gateway.ingest import Ingest
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings


class _NoProducer:
    """Unit tests here never publish."""


def ingest(allowed: str = "", proxies: str = "") -> Ingest:
    cfg = GatewaySettings(api_keys="k", allowed_sources=allowed, trusted_proxies=proxies)  # type: ignore[arg-type]
    return Ingest(cfg, _NoProducer(), GatewayMetrics())  # type: ignore[arg-type]


def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    assert ingest(proxies="10.0.0.0/8").source_of("203.0.113.9", "100.20.5.228") == "203.0.113.9"
    assert ingest().source_of("127.0.0.1", "100.20.5.228") == "127.0.0.1"


def test_forwarded_for_from_a_trusted_proxy_gives_the_nearest_untrusted_hop() -> None:
    ing = ingest(proxies="10.0.0.0/8, 127.0.0.1")
    assert ing.source_of("127.0.0.1", "100.20.5.228") == "100.20.5.228"
    # The sender can prepend anything; only the hop our proxy saw counts.
    assert ing.source_of("10.1.2.3", "100.20.5.228, 198.51.100.7") == "198.51.100.7"
    assert ing.source_of("10.1.2.3", "198.51.100.7, 100.20.5.228, 10.9.9.9") == "100.20.5.228"
    assert ing.source_of("10.1.2.3", " , ") == "10.1.2.3"


def test_allowlist_takes_addresses_and_networks() -> None:
    ing = ingest(allowed="100.20.5.228, 2001:db8::/32")
    ing.check_source("100.20.5.228")
    ing.check_source("2001:db8::1")
    for bad in ("100.20.5.229", "not-an-ip", None):
        with pytest.raises(SourceNotAllowed, match="CALLSTREAM_ALLOWED_SOURCES"):
            ing.check_source(bad)


def test_no_allowlist_allows_everyone() -> None:
    ingest().check_source(None)
    ingest().check_source("198.51.100.7")


def test_the_gateway_refuses_to_start_without_a_key() -> None:
    with pytest.raises(ValidationError, match="CALLSTREAM_API_KEYS"):
        GatewaySettings(_env_file=None)  # type: ignore[call-arg]
    assert GatewaySettings(_env_file=None, allow_unsigned=True).keys() == []  # type: ignore[call-arg]
    assert GatewaySettings(api_keys=" a, b ,").keys() == [b"a", b"b"]  # type: ignore[arg-type]
