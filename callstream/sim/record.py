"""The acknowledgement record of `callstream simulate --record FILE`: a line per delivery the server
answered 2xx, so that what was acknowledged can be checked against what was stored.

A line holds, tab-separated: when the answer came (unix ms), the event, the call or chat id, and the
BLAKE2b-64 digest (hex) of the body as sent. The gateway stores the body byte for byte, so the digest
names the message on its topic. An event acknowledged twice (a duplicate delivery) has two lines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple


def body_digest(body: bytes) -> str:
    """The record's name for a body: 16 hex digits."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


class Acknowledged(NamedTuple):
    at_ms: int
    event: str
    key: str
    digest: str

    def line(self) -> str:
        return f"{self.at_ms}\t{self.event}\t{self.key}\t{self.digest}\n"

    @classmethod
    def parse(cls, line: str) -> Acknowledged:
        at, event, key, digest = line.rstrip("\n").split("\t")
        return cls(int(at), event, key, digest)


def read_record(path: Path) -> Iterator[Acknowledged]:
    """Every line of a record file, in the order written (answers of several senders interleave)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Acknowledged.parse(line)
