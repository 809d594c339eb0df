"""The read side's tokens: bearer and cookie checks, rotation, and the loopback-only bind without tokens."""

from __future__ import annotations

import pytest

from streams.errors import ReadSideError
from streams.readauth import COOKIE, ReadAccess, check_bind, is_loopback

OLD, NEW = "old-token-0123456789abcdef", "new-token-fedcba9876543210"


def test_bearer_tokens_and_rotation() -> None:
    access = ReadAccess([NEW, OLD])
    assert access.required
    for token in (NEW, OLD):
        assert access.allows(f"Bearer {token}", None)
        assert access.allows(f"bearer {token}", None)
    for header in (None, "", "Bearer", "Bearer ", f"Basic {NEW}", f"Bearer {NEW}x", f"Bearer {NEW[:-1]}", NEW):
        assert not access.allows(header, None), header
    assert not ReadAccess([NEW]).allows(f"Bearer {OLD}", None)  # rotated out


def test_login_cookie_is_derived_from_the_token_and_flagged() -> None:
    access = ReadAccess([NEW, OLD])
    set_cookie = access.set_cookie(OLD, secure=False)
    name, _, rest = set_cookie.partition("=")
    value = rest.split(";")[0]
    assert name == COOKIE and value and OLD not in set_cookie
    flags = {f.strip() for f in rest.split(";")[1:]}
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= flags and "Secure" not in flags
    assert "Secure" in access.set_cookie(OLD, secure=True)
    assert access.allows(None, f"theme=dark; {COOKIE}={value}")
    flipped = value[:-1] + ("1" if value[-1] == "0" else "0")
    assert not access.allows(None, f"{COOKIE}={flipped}")
    assert not access.allows(None, f"{COOKIE}={OLD}")  # the token itself is not the cookie
    assert not ReadAccess([NEW]).allows(None, f"{COOKIE}={value}")  # its token was rotated out
    assert not access.allows(None, 'broken="cookie')


def test_without_tokens_everything_is_allowed() -> None:
    access = ReadAccess([])
    assert not access.required and access.allows(None, None)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, [], public=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.2", "10.1.2.3", "no-such-host.invalid"])
def test_other_hosts_need_tokens_or_public(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ReadSideError, match="CALLSTREAM_DASHBOARD_TOKENS") as err:
        check_bind(host, [], public=False)
    assert "\n" not in str(err.value) and "CALLSTREAM_DASHBOARD_PUBLIC=true" in str(err.value)
    check_bind(host, [NEW], public=False)
    check_bind(host, [], public=True)
