"""librdkafka's own test hook for fatal errors, reached through ctypes.

`rd_kafka_test_fatal_error` makes librdkafka raise a fatal error exactly as a fenced idempotent
producer would (there is no practical way to make a real broker fence one). confluent-kafka does
not expose it, so we call the bundled librdkafka with the handle's `rd_kafka_t *`, which is the
first field after the object header (`Handle` in confluent_kafka.h). The handle's name is checked
before anything else is called with it.
"""

from __future__ import annotations

import ctypes
import glob
import sys
from pathlib import Path

import confluent_kafka
import pytest

PRODUCER_FENCED = 90  # RD_KAFKA_RESP_ERR_PRODUCER_FENCED


def _lib() -> ctypes.CDLL:
    pkg = Path(confluent_kafka.__file__).parent
    found = sorted(glob.glob(str(pkg.parent / "confluent_kafka.libs" / "librdkafka*.so*")))
    if not found:
        pytest.skip("no bundled librdkafka next to confluent_kafka (a source build?)")
    lib = ctypes.CDLL(found[0])
    lib.rd_kafka_name.restype = ctypes.c_char_p
    lib.rd_kafka_name.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_test_fatal_error.restype = ctypes.c_int
    lib.rd_kafka_test_fatal_error.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    return lib


def trigger_fatal(producer: confluent_kafka.Producer, reason: str, code: int = PRODUCER_FENCED) -> None:
    """Make librdkafka put `producer` into the fatal state with `code`; the next poll() raises it."""
    lib = _lib()
    rk = ctypes.c_void_p.from_address(id(producer) + object.__basicsize__).value
    name = lib.rd_kafka_name(rk) or b""
    if b"#producer-" not in name:
        pytest.skip(f"unexpected confluent-kafka handle layout on {sys.platform}: {name!r}")
    assert lib.rd_kafka_test_fatal_error(rk, code, reason.encode()) == 0
