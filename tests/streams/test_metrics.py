"""Metrics as stored: readable field names over the short serialised ones the changelogs hold."""

from __future__ import annotations

import msgspec

from streams.metrics import Agg

# An Agg as the worker wrote it before its fields had readable names (msgpack, then JSON for /api/local).
STORED = b"\x84\xa1c\x81\xa1x\x01\xa4cost\xcb?\xf8\x00\x00\x00\x00\x00\x00\xa3dur\x81\x03\x01\xa3lat\x81\x05\x02"
SERVED = b'{"c":{"x":1},"cost":1.5,"dur":{"3":1},"lat":{"5":2}}'


def test_the_serialised_form_is_unchanged() -> None:
    agg = Agg(counts={"x": 1}, cost=1.5, duration_buckets={3: 1}, latency_buckets={5: 2})
    assert msgspec.msgpack.encode(agg) == STORED
    assert msgspec.json.encode(agg) == SERVED
    assert msgspec.msgpack.decode(STORED, type=Agg) == agg
    assert msgspec.json.decode(SERVED, type=Agg) == agg
