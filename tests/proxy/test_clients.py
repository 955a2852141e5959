"""Clients that leave early leave nothing behind."""

from __future__ import annotations

import asyncio

from aiohttp import web

from sidecar.app import PROXY

from ..conftest import eventually

MiB = 1024 * 1024


class Origin:
    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_post("/upload", self.upload)
        self.app.router.add_get("/download", self.download)
        self.app.router.add_get("/events", self.events)
        self.app.router.add_get("/slow-events", self.slow_events)
        self.active = 0

    async def upload(self, request: web.Request) -> web.Response:
        self.active += 1
        try:
            async for _ in request.content.iter_any():
                pass
            return web.Response(text="ok")
        finally:
            self.active -= 1

    async def download(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        try:
            resp = web.StreamResponse()
            resp.content_length = 100 * MiB
            await resp.prepare(request)
            for _ in range(100):
                await resp.write(b"d" * MiB)
            return resp
        finally:
            self.active -= 1

    async def slow_events(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        try:
            await asyncio.sleep(0.3)  # the client is gone before these headers
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            while True:
                await resp.write(b": ping\n\n")
                await asyncio.sleep(0.05)
        finally:
            self.active -= 1

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            while True:  # quiet: one comment every 10 s
                await resp.write(b": ping\n\n")
                await asyncio.sleep(10)
        finally:
            self.active -= 1


async def raw_request(
    url: str, head: bytes, body: bytes = b"", read: int = 0, linger: float = 0.0
) -> None:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)
    await writer.drain()
    if read:
        await reader.readexactly(read)
    await asyncio.sleep(linger)  # let the request reach the upstream first
    writer.transport.abort()  # leave without a goodbye


async def test_clients_leaving_mid_transfer_leave_no_task_or_connection(
    serve, start_sidecar
) -> None:
    origin = Origin()
    server = await serve(origin.app)
    sc = await start_sidecar(str(server.make_url("")).rstrip("/"))
    proxy_connector = sc.server.app[PROXY].upstream.session.connector
    await asyncio.sleep(0.1)
    tasks_before = len(asyncio.all_tasks())

    cases = [
        (b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n", b"u" * MiB, 0),
        (b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n", b"", 2 * MiB),
        (b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n", b"", 20),
        (b"GET /slow-events HTTP/1.1\r\nHost: x\r\n\r\n", b"", 0),
    ]
    for head, body, read in cases:
        slow = b"slow" in head
        await raw_request(sc.url, head, body, read, linger=0.1 if slow else 0.0)
        if slow:
            assert origin.active == 1  # the upstream got it, the client is gone
        await eventually(lambda: origin.active == 0, timeout=5)
        await eventually(lambda: len(proxy_connector._acquired) == 0, timeout=5)
    await eventually(lambda: len(asyncio.all_tasks()) <= tasks_before, timeout=5)
    assert sc.registry.subscriptions == []
