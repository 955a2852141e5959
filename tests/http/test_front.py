"""The front door: what a client sees on one connection, whichever server answers it."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from ..conftest import Sidecar

BIG = bytes(range(256)) * (32 * 1024)  # 8 MiB


class Origin:
    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_route("*", "/echo", self.echo)
        self.app.router.add_get("/chunked", self.chunked)
        self.app.router.add_get("/big", self.big)

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"{request.method} {request.path_qs} {body.decode()}")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=BIG)

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"one ", b"two ", b"three"):
            await resp.write(part)
        return resp


@pytest.fixture
async def sidecar(serve, start_sidecar) -> Sidecar:
    server = await serve(Origin().app)
    return await start_sidecar(str(server.make_url("")).rstrip("/"), response_timeout=2.0)


async def exchange(sc: Sidecar, raw: bytes, feed_by: int = 0) -> bytes:
    """Send ``raw`` on one connection (``feed_by`` bytes at a time, if set); read to EOF."""
    host, port = sc.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    if feed_by:
        for i in range(0, len(raw), feed_by):
            writer.write(raw[i : i + feed_by])
            await writer.drain()
            await asyncio.sleep(0.001)
    else:
        writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def bodies(stream: bytes) -> list[bytes]:
    """The bodies of the answers in ``stream`` (Content-Length framed), in order."""
    out = []
    while stream:
        head, _, rest = stream.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        out.append(rest[:length])
        stream = rest[length:]
    return out


async def test_pipelined_requests_are_answered_in_order_across_the_handover(sidecar) -> None:
    # GETs go to the front door, the POST makes aiohttp take the connection
    # over, with the request after it already in the buffer.
    raw = (
        b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /echo?n=2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo?n=3 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
        b"GET /echo?n=4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answers = bodies(await exchange(sidecar, raw))
    assert answers == [
        b"GET /echo?n=1 ",
        b"GET /echo?n=2 ",
        b"POST /echo?n=3 body",
        b"GET /echo?n=4 ",
    ]


async def test_a_request_arriving_one_byte_at_a_time_is_answered(sidecar) -> None:
    raw = b"GET /echo?slow=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert bodies(await exchange(sidecar, raw, feed_by=1)) == [b"GET /echo?slow=1 "]


async def test_connection_close_is_honoured_and_said(sidecar) -> None:
    raw = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        b"GET /echo?ignored HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    stream = await exchange(sidecar, raw)  # ends: the sidecar closed the connection
    assert b"\r\nConnection: close\r\n" in stream
    assert bodies(stream) == [b"GET /echo "]


async def test_http_1_0_is_answered_by_aiohttp(sidecar) -> None:
    stream = await exchange(sidecar, b"GET /echo?v=10 HTTP/1.0\r\nHost: x\r\n\r\n")
    assert stream.startswith(b"HTTP/1.0 200") and bodies(stream) == [b"GET /echo?v=10 "]


async def test_malformed_requests_get_a_400_not_a_hang(sidecar) -> None:
    for raw in (
        b"GET /echo HTTP/1.1\nHost: x\nConnection: close\n\n",  # bare line feeds
        b"GET /echo HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"GET /echo HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",  # which host?
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
    ):
        stream = await exchange(sidecar, raw)
        assert stream.split(b" ", 2)[1] == b"400", (raw, stream[:80])


async def test_a_head_over_8_kib_is_still_served(sidecar) -> None:
    big = b"a" * 5000  # each header within every server's limit, the head over 8 KiB
    raw = (
        b"GET /echo?big=1 HTTP/1.1\r\nHost: x\r\nX-Big-1: %b\r\nX-Big-2: %b\r\n"
        b"Connection: close\r\n\r\n" % (big, big)
    )
    assert bodies(await exchange(sidecar, raw)) == [b"GET /echo?big=1 "]


async def test_a_chunked_upstream_answer_is_relayed_chunked(sidecar) -> None:
    raw = b"GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    stream = await exchange(sidecar, raw)
    head, _, body = stream.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(body[:size])
        body = body[size + 2 :]
    assert b"".join(chunks) == b"one two three"


async def test_answers_carry_a_date_and_no_invented_server_header(sidecar) -> None:
    stream = await exchange(sidecar, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = stream.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\ndate: " in head
    assert head.count(b"\r\nserver: ") == 1  # the upstream's own, passed through
    assert b"\r\nvia: 1.1 sidecar" in head


async def test_a_slow_reader_gets_a_big_answer_whole_then_the_next_one(sidecar) -> None:
    # 8 MiB for a client that reads slowly, then a POST on the same
    # connection: aiohttp takes over only once the big answer is written out.
    host, port = sidecar.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # a slow link, in effect
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024 * 1024)
    writer.write(
        b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nafter"
    )
    await writer.drain()
    await asyncio.sleep(0.5)  # the sidecar's buffer for this client fills up
    stream = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert bodies(stream) == [BIG, b"POST /echo after"]


async def test_idle_connections_close_after_the_keepalive_timeout(serve, start_sidecar) -> None:
    server = await serve(Origin().app)
    sc = await start_sidecar(str(server.make_url("")).rstrip("/"), keepalive_timeout=0.3)
    host, port = sc.url.removeprefix("http://").split(":")
    for request in (
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",  # the front door's
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",  # aiohttp's
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        answered = await asyncio.wait_for(reader.read(), 5)  # returns at the close
        writer.close()
        assert bodies(answered) and bodies(answered)[0].startswith(request.split(b" ")[0])
        assert 0.25 <= loop.time() - started < 3
