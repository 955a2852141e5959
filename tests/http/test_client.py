"""The lean upstream client's edge cases, against raw upstreams on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.http import client as http1

from ..conftest import Sidecar, eventually

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Answer], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> str:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_a_body_ended_by_closing_the_connection(raw_upstream, start_sidecar, http) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the end"
        )
        await writer.drain()
        writer.close()

    sc: Sidecar = await start_sidecar(await raw_upstream(answer))
    for _ in range(2):  # and the closed connection is not reused
        async with http.get(sc.url + "/x") as resp:
            assert resp.status == 200 and await resp.text() == "until the end"


async def test_a_pooled_connection_the_upstream_closed_is_retried_once(
    raw_upstream, start_sidecar, http
) -> None:
    served: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append((await read_head(reader)).split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive was promised, then the idle connection is dropped

    sc = await start_sidecar(await raw_upstream(answer))
    async with http.get(sc.url + "/a") as resp:
        assert await resp.text() == "ok"
    await asyncio.sleep(0.2)
    async with http.get(sc.url + "/b") as resp:
        assert resp.status == 200 and await resp.text() == "ok"
    assert served.count(b"GET /a HTTP/1.1") == served.count(b"GET /b HTTP/1.1") == 1


async def test_garbage_instead_of_http_is_a_502(raw_upstream, start_sidecar, http) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"SURPRISE\r\n\r\n")
        await writer.drain()
        writer.close()

    sc = await start_sidecar(await raw_upstream(answer))
    async with http.get(sc.url + "/x") as resp:
        assert resp.status == 502
        assert (await resp.json())["source"] == "sidecar"


async def test_chunked_bodies_and_interim_answers(serve, start_sidecar, http, raw_upstream) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        await writer.drain()

    sc = await start_sidecar(await raw_upstream(answer))
    async with http.get(sc.url + "/x") as resp:
        assert resp.status == 200
        assert resp.headers["X-Kept"] == "yes"
        assert await resp.text() == "hello world"


async def test_a_head_request_still_works(serve, start_sidecar, http) -> None:
    async def body(request: web.Request) -> web.Response:
        return web.Response(text="body")

    app = web.Application()
    app.router.add_get("/h", body)
    upstream = await serve(app)
    sc = await start_sidecar(str(upstream.make_url("")).rstrip("/"))
    async with http.head(sc.url + "/h") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "4"


async def test_an_answer_left_unread_does_not_stall_its_connection(
    raw_upstream, monkeypatch
) -> None:
    # An answer arrives whole in one read while nobody reads it: reading
    # pauses past HIGH_WATER, but the message is complete, so the connection
    # must go back to the pool reading, or the next request on it would wait
    # for a timeout. (A small HIGH_WATER, so that one read crosses it.)
    monkeypatch.setattr(http1, "HIGH_WATER", 1024)
    big = b"b" * (32 * 1024)
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                request_line = (await read_head(reader)).split(b"\r\n")[0]
            except asyncio.IncompleteReadError:
                return
            body = big if b" /big " in request_line else b"ok"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()

    url = URL(await raw_upstream(answer))
    pool = http1.Pool(url.host or "", url.port or 80, connect_timeout=5.0)
    try:
        first = await pool.get("/big", CIMultiDict(Host="x"), 5.0)
        await eventually(lambda: first.complete)  # all of it arrives; nothing is read
        first.close()  # the client that asked for it left
        second = await pool.get("/small", CIMultiDict(Host="x"), 5.0)
        assert second.status == 200
        assert b"".join([chunk async for chunk in second.content.iter_any()]) == b"ok"
        assert connections == 1  # the same connection, reading again
    finally:
        pool.close()
