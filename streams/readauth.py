"""Who may read the worker's web pages: the dashboard tokens.

With `CALLSTREAM_DASHBOARD_TOKENS` set, everything the worker's web server answers, except the
probes and the login page, wants one of them: as `Authorization: Bearer <token>` (the JSON API,
Prometheus, the other workers) or in the cookie the login page sets (the browser). Without tokens
the web server listens on loopback only, unless `CALLSTREAM_DASHBOARD_PUBLIC=true` says otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Sequence
from http.cookies import CookieError, SimpleCookie

from streams.errors import ReadSideError

# The probes answer without a token: a supervisor or Kubernetes asks them without one.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/logout"})
COOKIE = "callstream_dashboard"
COOKIE_MAX_AGE_S = 7 * 24 * 3600
SHORT_TOKEN = 16


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _cookie_value(token: str) -> str:
    # The cookie holds a value derived from the token, not the token: no cookie-unsafe characters,
    # and the token itself never sits in the browser's cookie store.
    return hmac.new(token.encode(), b"callstream dashboard cookie", hashlib.sha256).hexdigest()


class ReadAccess:
    """The tokens, compared in constant time (each candidate against every token, digests of equal length)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self._digests = [_digest(t) for t in tokens]
        self._cookies = [_digest(_cookie_value(t)) for t in tokens]

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def valid(self, token: str) -> bool:
        return _any_equal(_digest(token), self._digests)

    def allows(self, authorization: str | None, cookie_header: str | None) -> bool:
        """Whether a request with these `Authorization` and `Cookie` headers may read."""
        if not self.required:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and self.valid(token.strip()):
            return True
        cookie = _cookie(cookie_header)
        return cookie is not None and _any_equal(_digest(cookie), self._cookies)

    def set_cookie(self, token: str, secure: bool) -> str:
        """The `Set-Cookie` value that logs a browser in with `token`."""
        flags = "; Secure" if secure else ""
        return f"{COOKIE}={_cookie_value(token)}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Strict{flags}"

    @staticmethod
    def clear_cookie() -> str:
        return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"


def _any_equal(candidate: bytes, digests: list[bytes]) -> bool:
    found = False
    for d in digests:  # no early exit: the time does not say which token matched
        found |= hmac.compare_digest(candidate, d)
    return found


def _cookie(header: str | None) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) reaches this machine's loopback interface only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def check_bind(host: str, tokens: Sequence[str], public: bool) -> None:
    """Refuse to serve the read side on a reachable address without tokens, unless told to on purpose."""
    if tokens or public or is_loopback(host):
        return
    raise ReadSideError(
        f"the worker would serve its dashboard, /api/* and /metrics to anyone who reaches {host or 'every address'}: "
        "set CALLSTREAM_DASHBOARD_TOKENS (comma-separated), listen on 127.0.0.1 (--web-host or "
        "CALLSTREAM_WEB_HOST), or set CALLSTREAM_DASHBOARD_PUBLIC=true to open them on purpose"
    )
