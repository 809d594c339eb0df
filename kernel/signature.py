"""`x-retell-signature` exactly as the official retell-sdk signs it.

The header is `v=<unix ms>,d=<hex HMAC-SHA256>`; the HMAC is over the raw body followed by the
decimal timestamp, keyed with the API key. A timestamp more than five minutes from now, either
way, is refused, so a captured delivery cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence

from kernel.errors import CallstreamError

TOLERANCE_MS = 5 * 60 * 1000


class SignatureError(CallstreamError):
    """The delivery is not signed by a key we hold. Nothing is stored."""

    reason = "bad_signature"


class MissingSignature(SignatureError):
    reason = "missing_signature"


class MalformedSignature(SignatureError):
    reason = "malformed_signature"


class StaleSignature(SignatureError):
    reason = "stale_signature"


_HEADER = re.compile(rb"v=(\d{1,16}),d=([0-9a-f]{64})")


def sign(body: bytes, key: str | bytes, timestamp_ms: int | None = None) -> str:
    """The header value retell-sdk's `sign` makes for `body`."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    k = key.encode() if isinstance(key, str) else key
    digest = hmac.new(k, body + str(ts).encode(), hashlib.sha256).hexdigest()
    return f"v={ts},d={digest}"


def verify(
    body: bytes,
    header: str | bytes | None,
    keys: Sequence[bytes],
    now_ms: int | None = None,
    tolerance_ms: int = TOLERANCE_MS,
) -> int:
    """Check `header` against `body` with any of `keys`; return the signed timestamp (unix ms).

    Raises a `SignatureError` subclass naming what is wrong. Every key is tried with a
    constant-time comparison, so timing tells nothing about which key or digest prefix matched.
    """
    if not header:
        raise MissingSignature("no x-retell-signature header")
    raw = header.encode("latin-1") if isinstance(header, str) else header
    m = _HEADER.fullmatch(raw.strip())
    if m is None:
        raise MalformedSignature("x-retell-signature is not of the form v=<unix ms>,d=<64 hex digits>")
    ts_bytes, digest = m.group(1), m.group(2)
    ts = int(ts_bytes)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(now - ts) > tolerance_ms:
        raise StaleSignature(
            f"x-retell-signature timestamp {ts} is {abs(now - ts) / 1000:.0f}s from now "
            f"(tolerance {tolerance_ms // 1000}s)"
        )
    message = body + ts_bytes
    want = bytes.fromhex(digest.decode())
    ok = False
    for key in keys:
        # hmac.digest is OpenSSL's one-shot HMAC: the same value as hmac.new(...), at a fraction of the cost.
        ok |= hmac.compare_digest(hmac.digest(key, message, "sha256"), want)
    if not ok:
        raise SignatureError("x-retell-signature does not match the body with any configured API key")
    return ts
