"""Answers from the cache as the front door writes them (at once, in the
callback that read the request), on each event loop the sidecar runs on:
asyncio's own, and uvloop (what ``sidecar`` runs on where it is installed),
whose transports buffer what the socket does not take at once differently.
Each scenario runs its own loop, the fake upstream and the sidecar on it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web

from sidecar.config import Settings
from sidecar.demo.fake import FakeGptme
from sidecar.server import Server

from ..conftest import Sidecar, eventually

CREATE = orjson.dumps({"prompt": "p", "messages": [{"role": "user", "content": "hello"}]})
RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


def on_each_loop(scenario: Callable[[FakeGptme, Server], Awaitable[None]]) -> Callable[[str], None]:
    """The test runs ``scenario`` on a new loop of each kind, with the fake
    gptme upstream and a caching sidecar in front of it on that loop."""

    @pytest.mark.parametrize("loop", list(RUNNERS))
    def test(loop: str) -> None:
        async def run() -> None:
            if loop == "uvloop":
                assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            fake = FakeGptme()
            runner = web.AppRunner(fake.app)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = runner.addresses[0][1]
                settings = Settings(
                    upstream=f"http://127.0.0.1:{port}",
                    host="127.0.0.1",
                    port=0,
                    store="memory",
                    cache="events",
                    reconnect_min=0.05,
                    reconnect_max=0.2,
                )
                sidecar = Server(settings)
                try:
                    await sidecar.start()
                    await asyncio.wait_for(scenario(fake, sidecar), 20)
                finally:
                    await sidecar.stop(grace=1.0)
            finally:
                await runner.cleanup()

        RUNNERS[loop](run())

    test.__name__ = scenario.__name__
    test.__doc__ = scenario.__doc__
    return test


async def _hits_pipelined(fake: FakeGptme, sidecar: Server) -> None:
    """A small answer and a large one from the cache, asked for in turn on
    one connection: each whole and in the order asked (the front door writes
    a small one with its head in one write, a large one after its head)."""
    sizes = {"small": 100, "large": 200_000}
    async with aiohttp.ClientSession() as http:  # (a PUT: aiohttp's, on a connection of its own)
        for cid, size in sizes.items():
            url = f"http://127.0.0.1:{sidecar.port}/api/v2/conversations/{cid}"
            async with http.put(url, data=CREATE) as created:
                assert created.status == 200, await created.text()
            fake.conversations[cid].log.append({"role": "user", "content": "x" * size})
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)

    async def ask(cids: list[str]) -> list[tuple[bytes, bytes]]:
        for cid in cids:
            writer.write(f"GET /api/v2/conversations/{cid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        answers = []
        for _ in cids:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append((head, await reader.readexactly(length)))
        return answers

    try:
        await ask(list(sizes))  # the streams open, each answer is stored
        seen = Sidecar(sidecar)
        await eventually(lambda: all(seen.snapshot(c).stream == "live" for c in sizes))
        await ask(list(sizes))
        order = ["small", "large"] * 4
        for cid, (head, body) in zip(order, await ask(order), strict=True):
            assert b"Cache-Status: sidecar; hit" in head, head
            assert orjson.loads(body)["log"][-1]["content"] == "x" * sizes[cid]
    finally:
        writer.close()


test_hits_pipelined_on_one_connection_come_whole_and_in_order = on_each_loop(_hits_pipelined)
