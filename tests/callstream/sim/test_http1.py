"""The simulator's HTTP/1.1 client against a real loopback server that answers in every way HTTP allows."""

from __future__ import annotations

import asyncio

import pytest

from callstream.sim.http1 import BadURL, Pool, Target

REQUEST_END = b"\r\n\r\n"


async def _serve(answers: list[bytes], close_after_each: bool = False) -> tuple[asyncio.Server, list[bytes]]:
    """A server that reads each request (head and body) and writes the next scripted answer."""
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while answers:
                head = await reader.readuntil(REQUEST_END)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                got.append(await reader.readexactly(length))
                writer.write(answers.pop(0))
                await writer.drain()
                if close_after_each:  # without saying so: the client finds out on its next request
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), got


async def _post_all(answers: list[bytes], n: int, close_after_each: bool = False) -> tuple[list[int], list[bytes]]:
    server, got = await _serve(answers, close_after_each)
    port = server.sockets[0].getsockname()[1]
    target = Target.from_url(f"http://127.0.0.1:{port}/webhook")
    pool = Pool(target, timeout=5)
    statuses = []
    for i in range(n):
        request, _ = target.request(b'{"n": %d}' % i, "v=1,d=" + "0" * 64)
        answer = await pool.post(request)
        assert answer.status == 0 or (answer.seconds is not None and answer.seconds >= 0)
        statuses.append(answer.status)
    pool.close()
    server.close()
    return statuses, got


def test_reads_every_kind_of_body_and_keeps_the_connection() -> None:
    answers = [
        b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n",
        b'HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"error":"bad"}',
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\ntransfer-encoding: chunked\r\n\r\n"
        b"4\r\nbusy\r\n3;ext=1\r\n!!!\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]
    statuses, got = asyncio.run(_post_all(answers, 4))
    assert statuses == [204, 400, 503, 204]  # all on one connection: each body was read to its end
    assert got == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']


def test_a_connection_the_server_closed_is_replaced_without_a_failure() -> None:
    ok = b"HTTP/1.1 204 No Content\r\n\r\n"
    statuses, got = asyncio.run(_post_all([ok, ok, ok], 3, close_after_each=True))
    assert statuses == [204, 204, 204]
    assert len(got) == 3  # each request reached the server once


def test_connection_close_and_a_body_to_the_end_of_the_connection() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
    ]
    statuses, _ = asyncio.run(_post_all(answers, 2, close_after_each=True))
    assert statuses == [200, 200]


def test_garbage_and_no_server_are_status_zero() -> None:
    statuses, _ = asyncio.run(_post_all([b"SSH-2.0-OpenSSH\r\n\r\n"], 1))
    assert statuses == [0]

    async def refused() -> int:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        target = Target.from_url(f"http://127.0.0.1:{port}/")
        return (await Pool(target, timeout=5).post(target.request(b"{}", None)[0])).status

    assert asyncio.run(refused()) == 0


def test_urls() -> None:
    t = Target.from_url("https://hooks.example.com/retell?x=1")
    assert (t.host, t.port, t.path, t.tls) == ("hooks.example.com", 443, "/retell?x=1", True)
    request, body_at = Target.from_url("http://127.0.0.1:8000/webhook").request(b"{}", "v=1,d=ab")
    assert request.startswith(b"POST /webhook HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n")
    assert b"\r\nx-retell-signature: v=1,d=ab\r\ncontent-length: 2\r\n\r\n" in request
    assert request[body_at:] == b"{}"
    with pytest.raises(BadURL):
        Target.from_url("127.0.0.1:8000/webhook")
