"""One client request and the means to answer it, whichever server read it.

The proxy works on an :class:`Exchange`. Two servers provide one: aiohttp
(:class:`WebExchange`, every kind of request) and the front door in
:mod:`sidecar.http.front` (bodyless HTTP/1.1 GETs, the hot path), so a GET is
proxied by the same code whichever server read it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import HttpVersion, web
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import BodyStalled, BodyTooLarge, too_large
from .headers import dropped

__all__ = [
    "Detached",
    "Exchange",
    "PassthroughResponse",
    "WebExchange",
    "is_websocket",
    "stream_body",
]


class Exchange(Protocol):
    """One client request and the means to answer it, whichever server read it.

    ``respond`` sends a whole answer (headers and body in one write where the
    server can); ``start``, ``write`` and ``finish`` stream one. Headers are
    sent as given: a body of known length carries its ``Content-Length``.
    ``status`` is what was answered, for metrics and the access log.
    """

    method: str
    version: HttpVersion
    remote: str | None
    scheme: str
    kind: str
    status: int
    #: What the proxy found from the request's head alone (its route, its
    #: credentials' fingerprint, its cache key), by name: pure functions of
    #: the head's bytes, so the front door shares them between requests
    #: whose heads are the same bytes.
    derived: dict[str, Any]

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def started(self) -> bool: ...
    def body(self, limit: int, idle: float) -> AsyncIterator[bytes] | None: ...
    async def respond(
        self, status: int, reason: str | None, headers: CIMultiDict[str], body: bytes
    ) -> None: ...
    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> None: ...
    async def write(self, chunk: bytes) -> None: ...
    async def finish(self) -> None: ...
    def abort(self) -> None: ...


class Detached:
    """A GET the sidecar makes of its own accord, as the client it stands for
    would (its credentials and the headers a cache key holds), whose answer
    no client waits for: a background revalidation. Its conditions and
    cache directives are the sidecar's, not the client's; what it is
    answered is dropped (``status`` says what it was)."""

    #: The client's headers not carried over: its conditions, its cache
    #: directives and its wish to be held.
    DROPPED = ("If-None-Match", "If-Modified-Since", "Cache-Control", "Pragma", "Prefer")

    def __init__(self, of: Exchange) -> None:
        headers = CIMultiDict(of.headers)
        for name in self.DROPPED:
            headers.popall(name, None)
        self.headers = CIMultiDictProxy(headers)
        self.method = "GET"
        self.version = of.version
        self.remote = of.remote
        self.scheme = of.scheme
        self.kind = of.kind
        self.status = 0
        self.started = False
        self.derived: dict[str, Any] = {}

    def body(self, limit: int, idle: float) -> AsyncIterator[bytes] | None:
        return None

    async def respond(
        self, status: int, reason: str | None, headers: CIMultiDict[str], body: bytes
    ) -> None:
        self.status = status

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        self.status = status

    async def write(self, chunk: bytes) -> None:
        pass

    async def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


class PassthroughResponse(web.StreamResponse):
    """A streamed response that sends the upstream's headers as they came.

    aiohttp adds ``Server`` and a default ``Content-Type`` to every response;
    a proxy must not invent either. (It does add ``Date`` when the upstream
    sent none, as RFC 9110 asks of a forwarding recipient.)
    """

    def __init__(self, *, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._absent = [h for h in ("Server", "Content-Type") if h not in headers]
        # A body of known length: send the headers with its first bytes, one
        # write instead of two. Streams (SSE, chunked) send headers at once.
        self._send_headers_immediately = "Content-Length" not in headers

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        for name in self._absent:
            self.headers.popall(name, None)


class WebExchange:
    """An exchange read by aiohttp's server: any method, bodies, WebSocket."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.method = request.method
        self.headers = request.headers
        self.version = request.version
        self.remote = request.remote
        self.scheme = request.scheme
        self.kind = "pass"
        self.status = 0
        self.derived: dict[str, Any] = {}
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None and self.response.prepared

    def body(self, limit: int, idle: float) -> AsyncIterator[bytes] | None:
        request = self.request
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit)
        return stream_body(request, limit, idle) if request.body_exists else None

    async def respond(
        self, status: int, reason: str | None, headers: CIMultiDict[str], body: bytes
    ) -> None:
        await self.start(status, reason, headers)
        assert self.response is not None
        if body:
            await self.response.write(body)
        await self.response.write_eof()

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        self.status = status
        self.response = PassthroughResponse(status=status, reason=reason, headers=headers)
        await self.response.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


def is_websocket(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in dropped(request.headers, frozenset())
    )


async def stream_body(request: web.Request, limit: int, idle: float) -> AsyncIterator[bytes]:
    """The request body as it comes: at most ``limit`` bytes, none of its
    reads waiting longer than ``idle`` seconds (nginx's client_body_timeout)."""
    size = 0
    reader = request.content
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await reader.readany()
        except TimeoutError:
            raise BodyStalled from None
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        yield chunk
