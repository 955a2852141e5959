"""Fixtures: real upstreams and a real sidecar, each on a loopback socket."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import REGISTRY
from sidecar.config import Settings
from sidecar.demo.fake import FakeGptme
from sidecar.server import Server
from sidecar.state.registry import Registry

from .real import servers

Start = Callable[..., Awaitable[TestServer]]

# Sidecar processes the tests start keep their default store (a SQLite file
# per upstream under $XDG_STATE_HOME) in a directory of this run's own.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="sidecar-tests-state-")


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    """Start an aiohttp app on 127.0.0.1; everything is closed at the end."""
    servers: list[TestServer] = []

    async def start(app: web.Application, port: int | None = None) -> TestServer:
        server = TestServer(app, host="127.0.0.1", port=port, handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.close()


class Sidecar:
    """A running sidecar and what tests need from it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"

    @property
    def registry(self) -> Registry:
        return self.server.app[REGISTRY]

    def snapshot(self, resource_id: str) -> Any:
        conv = self.registry.get(resource_id)
        return conv.snapshot if conv else None


@pytest.fixture
async def start_sidecar() -> AsyncIterator[Callable[..., Awaitable[Sidecar]]]:
    """Start a sidecar as the process does, on a free loopback port."""
    servers: list[Server] = []

    async def start(upstream: str, **overrides: Any) -> Sidecar:
        settings = Settings(
            **{
                "upstream": upstream,
                "host": "127.0.0.1",
                "port": 0,
                "reconnect_min": 0.05,
                "reconnect_max": 0.2,
                "store": "memory",
                **overrides,
            }
        )
        server = Server(settings)
        await server.start()
        servers.append(server)
        return Sidecar(server)

    yield start
    for server in reversed(servers):
        await server.stop(grace=1.0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def eventually(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


class Gptme:
    """A fake gptme upstream with the sidecar in front, and a client for both."""

    def __init__(
        self,
        fake: FakeGptme,
        server: TestServer,
        sidecar: Sidecar,
        http: aiohttp.ClientSession,
        poller: aiohttp.ClientSession,
    ) -> None:
        self.fake = fake
        self.server = server  # the upstream's, to stop and start it again
        self.upstream = str(server.make_url("")).rstrip("/")
        self.sidecar = sidecar
        self.http = http
        #: A client that only GETs, as a poller does: its connections stay the
        #: front door's (``http``'s first PUT hands its connection to aiohttp's
        #: server for good, and the GETs after it go there too).
        self.poller = poller
        self.headers: dict[str, str] = {}

    def url(self, path: str, direct: bool = False) -> str:
        return (self.upstream if direct else self.sidecar.url) + path

    async def create(self, cid: str, direct: bool = False) -> str:
        async with self.http.put(
            self.url(f"/api/v2/conversations/{cid}", direct),
            json={"prompt": "p", "messages": [{"role": "user", "content": "hello"}]},
            headers=self.headers,
        ) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["session_id"])

    async def step(self, cid: str, session_id: str, direct: bool = False) -> aiohttp.ClientResponse:
        async with self.http.post(
            self.url(f"/api/v2/conversations/{cid}/step", direct),
            json={"session_id": session_id},
            headers=self.headers,
        ) as resp:
            await resp.read()
            return resp

    async def get(self, cid: str, direct: bool = False, **kwargs: Any) -> dict[str, Any]:
        async with self.http.get(
            self.url(f"/api/v2/conversations/{cid}", direct), headers=self.headers, **kwargs
        ) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())

    async def session(self, cid: str) -> dict[str, Any]:
        return dict((await self.get(cid))["session"])

    async def live_etag(self, cid: str) -> tuple[str, str]:
        """The conversation's URL through the sidecar and its current ETag, stream live."""
        url = self.url(f"/api/v2/conversations/{cid}")
        await self.get(cid)
        await eventually(lambda: self.sidecar.snapshot(cid).stream == "live")
        async with self.http.get(url, headers=self.headers) as resp:
            return url, resp.headers["ETag"]

    async def wait_status(self, cid: str, status: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            session = await self.session(cid)
            if session["status"] == status:
                return session
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"status stayed {session['status']!r}, wanted {status!r}: {session}"
                )
            await asyncio.sleep(0.02)


@pytest.fixture
async def poller() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def gptme(
    serve: Start,
    start_sidecar: Callable[..., Awaitable[Sidecar]],
    http: aiohttp.ClientSession,
    poller: aiohttp.ClientSession,
):
    async def start(
        version: str = "0.31.0", sidecar_options: dict[str, Any] | None = None, **fake_options: Any
    ) -> Gptme:
        fake = FakeGptme(version, **fake_options)
        server = await serve(fake.app)
        upstream = str(server.make_url("")).rstrip("/")
        sidecar = await start_sidecar(upstream, **(sidecar_options or {}))
        return Gptme(fake, server, sidecar, http, poller)

    return start


# ------------------------------------------------- the real upstream servers
# Started once per test session (each takes a second or two), in processes
# of their own; each test uses conversations of its own. See tests/real/.


@pytest.fixture(scope="session")
def real_model() -> Iterator[servers.Process]:
    process = servers.start_model()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def real_gptme_0_31_0(real_model: servers.Process) -> Iterator[servers.Process]:
    process = servers.start_gptme("0.31.0", real_model.url)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def real_gptme_0_35_1(real_model: servers.Process) -> Iterator[servers.Process]:
    process = servers.start_gptme("0.35.1", real_model.url)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def real_opencode(real_model: servers.Process) -> Iterator[servers.Process]:
    process = servers.start_opencode(real_model.url)
    yield process
    process.stop()
