"""The group-wide view: every partition's book, from this worker and from the workers it shares the group with.

Each worker owns some partitions. `/api/local` gives the books of this worker's active partitions;
the group view asks every other worker that the partition assignor knows for theirs and keeps, per
partition, the newest book (highest commit sequence), so that the JSON API, the dashboard and the
failure-rate rule answer for the whole group whichever worker is asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgspec

from streams.metrics import ALL, Agg, merge, summarize
from streams.processor import Book, Processor

log = logging.getLogger(__name__)


class LocalBooks(msgspec.Struct):
    worker: str
    ready: bool
    books: dict[int, Book]


_dec_local = msgspec.json.Decoder(LocalBooks)


def trim(book: Book, since: int) -> Book:
    return Book(book.seq, book.totals, {w: v for w, v in book.windows.items() if w >= since})


class GroupView:
    def __init__(
        self,
        processor: Processor,
        partitions: int,
        me: str,
        active: Callable[[], set[int]],
        peers: Callable[[], list[str]],
        ready: Callable[[], bool],
        tokens: Sequence[str] = (),
    ) -> None:
        self.processor = processor
        self.partitions = partitions
        self.me = me.rstrip("/")
        self.active = active
        self.peers = peers
        self.ready = ready
        # The read side's tokens: a peer gets the first, or, during a rotation that reached it first
        # or not yet, whichever of them it took last time.
        self.tokens = list(tokens)
        self._token_of: dict[str, int] = {}
        self._client: httpx.AsyncClient | None = None

    def local(self, since: int = 0) -> LocalBooks:
        if not self.ready():
            return LocalBooks(self.me, False, {})
        return LocalBooks(self.me, True, {p: trim(self.processor.book(p), since) for p in sorted(self.active())})

    async def _peer(self, url: str, since: int) -> LocalBooks | None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=2.0)
        try:
            r = await self._get_local(self._client, url, since)
            r.raise_for_status()
            return _dec_local.decode(r.content)
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            log.warning("group view: worker %s did not answer: %s", url, exc)
            return None

    async def _get_local(self, client: httpx.AsyncClient, url: str, since: int) -> httpx.Response:
        first = self._token_of.get(url, 0)
        order = [(first + i) % len(self.tokens) for i in range(len(self.tokens))] or [-1]
        for i in order:
            headers = {"Authorization": f"Bearer {self.tokens[i]}"} if i >= 0 else None
            r = await client.get(f"{url.rstrip('/')}/api/local", params={"since": since}, headers=headers)
            if r.status_code != 401:
                self._token_of[url] = max(i, 0)
                break
        return r

    async def books(self, since: int = 0) -> tuple[dict[int, Book], list[str]]:
        """Every partition's newest book, and the workers that answered."""
        answers = [self.local(since)]
        peers = [u for u in self.peers() if u.rstrip("/") != self.me]
        if peers:
            got = await asyncio.gather(*(self._peer(u, since) for u in peers))
            answers.extend(a for a in got if a is not None)
        out: dict[int, Book] = {}
        for a in answers:
            for p, b in a.books.items():
                if p not in out or b.seq > out[p].seq:
                    out[p] = b
        return out, [a.worker for a in answers if a.ready]

    @staticmethod
    def windows(books: dict[int, Book]) -> dict[int, dict[str, Agg]]:
        out: dict[int, dict[str, Agg]] = {}
        for b in books.values():
            for w, scopes in b.windows.items():
                tgt = out.setdefault(w, {})
                for scope, agg in scopes.items():
                    tgt.setdefault(scope, Agg()).add(agg)
        return out

    async def snapshot(self, since: int = 0) -> dict[str, Any]:
        """The JSON API's answer: totals and windows, overall and per agent, for the whole group."""
        books, workers = await self.books(since)
        scopes = sorted({s for b in books.values() for s in b.totals})
        totals = {s: summarize(merge(b.totals[s] for b in books.values() if s in b.totals)) for s in scopes}
        wins = self.windows(books)
        return {
            "complete": len(books) == self.partitions,
            "partitions": sorted(books),
            "workers": workers,
            "overall": totals.pop(ALL, summarize(Agg())),
            "agents": totals,
            "windows": [
                {
                    "start": w,
                    "overall": summarize(s.get(ALL, Agg())),
                    "agents": {a: summarize(v) for a, v in sorted(s.items()) if a != ALL},
                }
                for w, s in sorted(wins.items())
            ],
        }

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
