"""x-retell-signature: our sign/verify against the official retell-sdk, both ways."""

from __future__ import annotations

import hmac
import time

import pytest
from retell import Retell
from retell.lib import webhook_auth

from callstream.fakecalls import CallFactory, Fleet
from kernel import signature
from kernel.signature import (
    TOLERANCE_MS,
    MalformedSignature,
    MissingSignature,
    SignatureError,
    StaleSignature,
    sign,
    verify,
)

KEY = "key_3f1c2b0a9e8d7c6b5a4f3e2d1c0b9a8f"
OLD_KEY = "key_old_00000000000000000000000000"


@pytest.fixture
def body() -> bytes:
    # Non-ASCII on purpose: retell-sdk signs the UTF-8 text, we sign the raw bytes; they must agree.
    ev = CallFactory(Fleet(seed=2), seed=2).events("completed")[-1]
    ev.payload["call"]["call_summary"] = "Réservé pour jeudi — merci 👍"
    return ev.body()


def test_retell_sdk_accepts_what_we_sign(body: bytes) -> None:
    header = sign(body, KEY)
    assert webhook_auth.verify(body.decode(), KEY, header) is True
    assert Retell(api_key=KEY).verify(body.decode(), api_key=KEY, signature=header) is True
    assert webhook_auth.verify(body.decode() + " ", KEY, header) is False


def test_we_accept_what_retell_sdk_signs(body: bytes) -> None:
    header = webhook_auth.symmetric["sign"](body.decode(), KEY)
    ts = verify(body, header, [KEY.encode()])
    assert abs(ts - time.time() * 1000) < 5000
    assert header == sign(body, KEY, ts)  # byte for byte the same scheme


@pytest.mark.parametrize("skew_ms", [-TOLERANCE_MS + 1000, TOLERANCE_MS - 1000])
def test_both_accept_within_the_tolerance_either_way(body: bytes, skew_ms: int) -> None:
    now = int(time.time() * 1000)
    header = webhook_auth.symmetric["sign"](body.decode(), KEY, now + skew_ms)
    assert verify(body, header, [KEY.encode()], now_ms=now) == now + skew_ms
    assert webhook_auth.symmetric["verify"](body.decode(), KEY, header, {"timestamp": now}) is True


@pytest.mark.parametrize("skew_ms", [-TOLERANCE_MS - 1000, TOLERANCE_MS + 1000])
def test_both_refuse_outside_the_tolerance_either_way(body: bytes, skew_ms: int) -> None:
    now = int(time.time() * 1000)
    header = webhook_auth.symmetric["sign"](body.decode(), KEY, now + skew_ms)
    with pytest.raises(StaleSignature, match="from now"):
        verify(body, header, [KEY.encode()], now_ms=now)
    assert webhook_auth.symmetric["verify"](body.decode(), KEY, header, {"timestamp": now}) is False


def test_any_of_several_keys_verifies_during_a_rotation(body: bytes) -> None:
    keys = [KEY.encode(), OLD_KEY.encode()]
    assert verify(body, webhook_auth.symmetric["sign"](body.decode(), OLD_KEY), keys)
    assert verify(body, webhook_auth.symmetric["sign"](body.decode(), KEY), keys)
    with pytest.raises(SignatureError, match="any configured API key"):
        verify(body, sign(body, "key_someone_else"), keys)


def test_a_changed_body_or_timestamp_is_refused(body: bytes) -> None:
    header = sign(body, KEY)
    with pytest.raises(SignatureError):
        verify(body[:-1] + b" ", header, [KEY.encode()])
    ts, digest = header.split(",")
    moved = f"v={int(ts[2:]) + 1},{digest}"
    with pytest.raises(SignatureError):
        verify(body, moved, [KEY.encode()])
    assert webhook_auth.verify(body.decode(), KEY, moved) is False


@pytest.mark.parametrize(
    "header",
    [
        "",
        "v=1,d=",
        "d=" + "a" * 64,
        "v=abc,d=" + "a" * 64,
        "v=1,d=" + "A" * 64,
        "v=1,d=" + "a" * 63,
        "v=1, d=" + "a" * 64,
        "t=1,v1=" + "a" * 64,
        "v=1,d=" + "a" * 64 + ",x=1",
    ],
)
def test_malformed_headers_are_refused_as_retell_sdk_does(body: bytes, header: str) -> None:
    with pytest.raises(MissingSignature if not header else MalformedSignature):
        verify(body, header, [KEY.encode()])
    if header:
        assert webhook_auth.verify(body.decode(), KEY, header) is False


def test_missing_header_is_named(body: bytes) -> None:
    with pytest.raises(MissingSignature, match="no x-retell-signature"):
        verify(body, None, [KEY.encode()])


def test_every_key_is_compared_in_constant_time(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # Timing must not tell which key matched: every key is compared, with hmac.compare_digest.
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signature.hmac, "compare_digest", spy)
    keys = [KEY.encode(), OLD_KEY.encode(), b"key_third"]
    verify(body, sign(body, KEY), keys)  # matches the first key, yet all three are compared
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(SignatureError):
        verify(body, sign(body, "nobody"), keys)
    assert len(calls) == 3
