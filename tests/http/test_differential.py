"""One behaviour for both paths: the front door against aiohttp's server alone.

The front door exists for speed; its right to exist is that nobody can tell
it is there. The same request byte streams (valid, pipelined, malformed) go
to a sidecar with the front door and to one without it (``front_door =
false``), both in front of one recording upstream. The upstream must receive
the same requests and the clients the same answers, byte for byte, once the
values that must differ are masked: ``Date``, and what the sidecar's own
snapshot says (each sidecar has its own).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.config import Settings
from sidecar.server import Server

# ----------------------------------------------------------- the upstream


class Recorder:
    """Answers every request with what it received, and keeps it."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.echo)

    async def echo(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/events"):
            return web.Response(status=404)  # the sidecars' own streams: not compared
        body = await request.read()
        seen = {
            "method": request.method,
            "target": request.raw_path,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": [[k, v] for k, v in request.headers.items() if k.lower() != "host"],
            "body": body.decode("latin-1"),
        }
        if request.path != "/api/v2":  # the readiness probe: not compared
            self.seen.append(seen)
        return web.Response(body=orjson.dumps(seen), content_type="application/json")


# ------------------------------------------------------- requests as bytes

PATHS = [
    "/api/v2",
    "/api/v2/conversations/c1",
    "/api/v2/conversations/c1?x=1",
    "/api/v2/conversations/..%2Fadmin",
    "/api/v2/conversations/a%2Fb",
    "/other/path",
    "/_sidecar/healthz",
    "/_sidecar/conversations",
    "http://elsewhere.invalid/api/v2",
]
HEADERS = [
    b"Accept: application/json",
    b"X-Forwarded-For: 10.0.0.1",
    b"Via: 1.0 edge",
    b'If-None-Match: W/"abc"',
    b"Cookie: a=b",
    b"Authorization: Bearer t",
    b"Connection: keep-alive",
    b"Connection: X-Hop",
    b"X-Hop: 1",
    b"Expect: 100-continue",
    b"X-Folded: a\r\n b",  # obs-fold
    b"Host: second",  # a repeated Host
    b"Content-Length: 3",
    b"Transfer-Encoding: chunked",
    b"X-Empty:",
    b"X-Space : v",
    b"X-Ctl: a\x01b",
    b"X-Utf8: \xc3\xa9",
]


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "DELETE", "G\x00T"]))
    path = draw(st.sampled_from(PATHS))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0"]))
    lines = [f"{method} {path} {version}".encode("latin-1")]
    if draw(st.booleans()) or version == "HTTP/1.1":
        if draw(st.integers(0, 9)):
            lines.append(b"Host: 127.0.0.1")
    lines += draw(st.lists(st.sampled_from(HEADERS), max_size=4))
    body = b""
    if method == "POST" and draw(st.booleans()):
        lines.append(b"Content-Length: 3")
        body = b"abc"
    end = b"\n" if draw(st.integers(0, 19)) == 0 else b"\r\n"
    return end.join(lines) + end + end + body


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    requests = draw(st.lists(request_bytes(), min_size=1, max_size=3))
    closing = (
        b"GET /api/v2/conversations/c1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    return b"".join(requests) + closing


# ------------------------------------------------------------- comparing

_DATE = re.compile(rb"(?im)^date: [^\r\n]*")
_SESSION = re.compile(rb'"session":\{[^{}]*(\{[^{}]*\}[^{}]*)*\},?')
_ETAG = re.compile(rb'(?im)^etag: W/"[^"]*;sc=[0-9a-f]+"')
_LENGTH = re.compile(rb"(?im)^content-length: \d+")


def masked(answer: bytes) -> bytes:
    answer = _DATE.sub(b"date: *", answer)
    if b'"session":' in answer:  # a merged answer: each sidecar's own snapshot
        answer = _SESSION.sub(b"", answer)
        answer = _ETAG.sub(b"etag: *", answer)
        answer = _LENGTH.sub(b"content-length: *", answer)
    return answer


def alike(front: tuple[bytes, list[Any]], alone: tuple[bytes, list[Any]]) -> bool:
    """The same, or the one difference aiohttp makes itself: when a read holds
    a valid request then a malformed one, aiohttp alone answers only the 400
    (it drops what it parsed from that read), while the front door has
    answered the valid request first and then hands the rest to aiohttp,
    which answers the same 400."""
    if front == alone:
        return True
    refused = _LENGTH.sub(b"content-length: *", alone[0])
    answered = _LENGTH.sub(b"content-length: *", front[0])
    return (
        refused.startswith(b"HTTP/1.0 400 ")
        and not alone[1]
        and answered.endswith(refused)
        and answered != refused
    )


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    got = b""
    try:
        async with asyncio.timeout(3):
            while chunk := await reader.read(65536):
                got += chunk
    except TimeoutError:
        got += b"<no close within 3 s>"
    writer.close()
    return got


class Pair:
    def __init__(self) -> None:
        self.recorder = Recorder()
        self.runner: web.AppRunner | None = None
        self.servers: list[Server] = []

    async def start(self) -> None:
        self.runner = web.AppRunner(self.recorder.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        upstream = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        for front_door in (True, False):
            server = Server(
                Settings(
                    upstream=upstream,
                    port=0,
                    front_door=front_door,
                    reconnect_min=5,
                    store="memory",
                )
            )
            await server.start()
            self.servers.append(server)

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop(grace=1)
        if self.runner is not None:
            await self.runner.cleanup()

    async def both(self, data: bytes) -> tuple[tuple[bytes, list[Any]], tuple[bytes, list[Any]]]:
        out = []
        for server in self.servers:
            self.recorder.seen.clear()
            answer = await exchange(server.port, data)
            out.append((masked(answer), list(self.recorder.seen)))
        return out[0], out[1]


SEEDS = [
    b"GET /api/v2/conversations/c1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"GET /api/v2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /api/v2 HTTP/1.1\nHost: a\n\n",  # bare LF
    b"GET /api/v2 HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    b"GET /api/v2 HTTP/1.1\r\nX-A: 1\r\nConnection: close\r\n\r\n",  # no Host
    b"GET /api/v2 HTTP/1.0\r\nHost: a\r\n\r\n",
    b"GET http://elsewhere.invalid/api/v2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /api/v2 HTTP/1.1\r\nHost: a\r\nX-F: a\r\n b\r\nConnection: close\r\n\r\n",
    b"GET /api/v2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    b"GET /api/v2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"GET /api/v2 HTTP/1.1\r\nHost: a\r\nConnection: X-Hop, close\r\nX-Hop: 1\r\n\r\n",
    b"GET /%2E%2E/api HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /api/v2 HTTP/1.1\r\nHost: a\r\nX-N: \x00\r\nConnection: close\r\n\r\n",
]


async def test_seeded_streams_get_the_same_answers_on_both_paths() -> None:
    pair = Pair()
    await pair.start()
    try:
        for data in SEEDS:
            with_front, without = await pair.both(data)
            assert with_front == without, data
    finally:
        await pair.stop()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(data=streams())
@example(data=SEEDS[0])
def test_generated_streams_get_the_same_answers_on_both_paths(data: bytes) -> None:
    async def run() -> None:
        pair = Pair()
        await pair.start()
        try:
            with_front, without = await pair.both(data)
            assert alike(with_front, without), data
        finally:
            await pair.stop()

    asyncio.run(run())
