"""A lean HTTP/1.1 client for bodyless GETs to an http upstream.

aiohttp's client builds a request object, a response object, a connector
lease and timers for every request; for a proxy hop most of that is work
the proxy then undoes. This client writes the already-filtered request head
in one ``write`` on a pooled keep-alive connection and parses the answer
with httptools (llhttp, the parser of Node.js and uvicorn). Everything else
(bodies, HEAD, WebSocket, https) still goes through aiohttp.

Two users: :class:`Pool` for the proxy's GETs, and :func:`open_stream` for
the subscriptions' event streams, one connection each: an idle subscription
takes about half the memory it did on aiohttp's client (make bench).

The response object offers the subset of ``aiohttp.ClientResponse`` the
proxy uses (``status``, ``reason``, ``headers``, ``content_type``,
``content_length``, ``content.iter_any()``, ``release()``, ``close()``), so
the relay and the merge do not care which client fetched it.

A pooled connection the upstream has closed is detected on reuse (no byte of
an answer arrived): the request, a GET, is retried once on a new connection.
The body is read with back-pressure: reading from the upstream pauses while
more than ``HIGH_WATER`` bytes wait for the client.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, cast

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["ConnectFailed", "Pool", "Response", "UnsafeHeader", "UpstreamResponse", "open_stream"]


class _Body(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]: ...


class UpstreamResponse(Protocol):
    """What the proxy reads of an upstream answer, from either client."""

    status: int
    reason: str | None

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> _Body: ...
    def release(self) -> Any: ...
    def close(self) -> None: ...


HIGH_WATER = 256 * 1024
MAX_IDLE = 256
#: A response head's bounds, as aiohttp's client has them: a longer line or
#: more fields is an upstream fault (502), not something to buffer.
MAX_LINE = 8190
MAX_FIELDS = 128


class ConnectFailed(aiohttp.ClientConnectionError):
    """The upstream could not be reached (``os_error`` says why)."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class UpstreamClosed(aiohttp.ServerDisconnectedError):
    """The connection closed before any byte of an answer: safe to retry a GET."""


class _Connection(asyncio.Protocol):
    __slots__ = ("_loop", "_pool", "_response", "closed", "transport")

    def __init__(self, pool: Pool | None) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._response: Response | None = None

    # asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:  # bytes nobody asked for: this connection is unusable
            self._abort()
            return
        response._got_bytes = True
        response._last_data = self._loop.time()
        try:
            response._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            response._fail(aiohttp.ClientPayloadError("unexpected protocol upgrade"))
            self._abort()
        except httptools.HttpParserError as exc:
            response._fail(aiohttp.ClientPayloadError(f"invalid HTTP from the upstream: {exc}"))
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, self._response = self._response, None
        if response is not None:
            response._connection_lost(exc)

    def pause_writing(self) -> None:  # pragma: no cover - a GET head is tiny
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # used by Response
    def start(self, response: Response, head: bytes) -> None:
        self._response = response
        assert self.transport is not None
        self.transport.write(head)

    def finished(self, reusable: bool) -> None:
        self._response = None
        if reusable and not self.closed and self._pool is not None:
            self._pool._put(self)
        else:
            self._abort()


class _Content:
    """What the relay reads: ``iter_any()``, like aiohttp's StreamReader."""

    __slots__ = ("_response",)

    def __init__(self, response: Response) -> None:
        self._response = response

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._response._chunks()


class Response:
    __slots__ = (
        "_body",
        "_buffered",
        "_conn",
        "_done",
        "_eof",
        "_error",
        "_got_bytes",
        "_head",
        "_idle_timeout",
        "_last_data",
        "_loop",
        "_parser",
        "_paused",
        "_raw_headers",
        "_reason",
        "_timer",
        "_waiter",
        "connection",
        "content",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, connection: _Connection, timeout: float | None, idle_timeout: float | None = None
    ) -> None:
        """``timeout`` bounds the wait for the head; ``idle_timeout``, if set,
        the silence between body bytes (a stream's heartbeat check)."""
        self._conn = connection
        self._parser = httptools.HttpResponseParser(self)
        self._loop = connection._loop
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._raw_headers: list[tuple[str, str]] = []
        self._reason = b""
        self._body: list[bytes] = []  # a list: a deque's first block alone is 600 bytes
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._got_bytes = False
        self._last_data = 0.0
        self._idle_timeout = idle_timeout
        self._done = False
        self._timer = (
            self._loop.call_later(timeout, self._header_timeout) if timeout is not None else None
        )
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.content = _Content(self)
        self.connection = None  # no aiohttp connection: nothing for the proxy to adjust

    # properties the proxy reads
    @property
    def content_type(self) -> str:
        raw = self.headers.get("Content-Type", "application/octet-stream")
        return raw.partition(";")[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._eof:  # a second answer nobody asked for: the connection is unusable
            raise ValueError("unsolicited message from the upstream")

    def on_status(self, status: bytes) -> None:
        self._reason += status
        if len(self._reason) > MAX_LINE:
            raise ValueError("the upstream's status line is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) + 2 > MAX_LINE or len(self._raw_headers) >= MAX_FIELDS:
            raise ValueError(
                f"the upstream's response head is too large (over {MAX_LINE} bytes in a "
                f"field or {MAX_FIELDS} fields)"
            )
        self._raw_headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:
            raise ValueError("the upstream switched protocols unasked (101)")
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._raw_headers.clear()
            self._reason = b""
            return
        self.status = status
        self.reason = self._reason.decode("utf-8", "surrogateescape") or None
        self.headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        self._raw_headers = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_timeout is not None:
            self._timer = self._loop.call_at(self._last_data + self._idle_timeout, self._idle)
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # the end of an interim (1xx) message
            return
        self._eof = True
        if self._paused and self._conn.transport is not None:
            # The whole message is in: the connection goes back to the pool
            # reading, whatever this response's reader still has to take.
            self._paused = False
            self._conn.transport.resume_reading()
        self._wake()
        self._finish(reusable=self._parser.should_keep_alive())

    # failures
    def _header_timeout(self) -> None:
        self._fail(aiohttp.ServerTimeoutError("no response headers in time"))
        self._conn._abort()

    def _idle(self) -> None:
        assert self._idle_timeout is not None
        if self._eof or self._done:
            return
        now = self._loop.time()
        if self._paused:
            self._last_data = now  # the reader holds bytes back: none are missing
        due = self._last_data + self._idle_timeout
        if now < due:  # bytes came since: check again when the silence could be long enough
            self._timer = self._loop.call_at(due, self._idle)
            return
        self._fail(aiohttp.ServerTimeoutError(f"no bytes for {self._idle_timeout:g} s"))
        self._conn._abort()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._eof:
            return
        if (
            self._head.done()
            and "Content-Length" not in self.headers
            and "chunked" not in (self.headers.get("Transfer-Encoding", "").lower())
        ):
            self._eof = True  # a body delimited by the end of the connection
            self._wake()
            self._finish(reusable=False)
            return
        if not self._got_bytes:
            self._fail(UpstreamClosed("the upstream closed the connection"))
        else:
            self._fail(aiohttp.ClientPayloadError("the upstream closed the connection mid-message"))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._timer is not None:
            self._timer.cancel()
        if not self._head.done():
            self._head.set_exception(error)
        self._wake()
        self._finish(reusable=False)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self, reusable: bool) -> None:
        if not self._done:
            self._done = True
            self._conn.finished(reusable)

    # reading
    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                chunk = self._body.pop(0)  # a few chunks at most: HIGH_WATER bounds them
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= HIGH_WATER // 4 and self._conn.transport:
                    self._paused = False
                    self._conn.transport.resume_reading()
                yield chunk
                continue
            if self._eof:  # complete: a later connection error is not this message's
                return
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            await self._waiter

    @property
    def complete(self) -> bool:
        """The whole message has arrived (read or not)."""
        return self._eof

    def complete_body(self) -> bytes | None:
        """The whole body if it has all arrived and none of it was read yet."""
        if not self._eof:
            return None
        body = b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        return body

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if it can."""
        if not self._eof:
            self.close()

    def close(self) -> None:
        """Abandon the response: a reader waiting for more is woken with an error."""
        if not self._eof:
            self._fail(aiohttp.ClientConnectionError("the response was closed"))


class Pool:
    """Keep-alive connections to one plain-http upstream."""

    def __init__(self, host: str, port: int, connect_timeout: float) -> None:
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout
        self._idle: collections.deque[_Connection] = collections.deque()

    async def get(
        self, target: str, headers: CIMultiDict[str], header_timeout: float | None
    ) -> Response:
        head = _head("GET", target, headers)
        for attempt in range(2):
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await _connect(self._host, self._port, self._connect_timeout, self)
            try:
                return await _ask(conn, head, header_timeout)
            except UpstreamClosed:
                if reused and attempt == 0:
                    continue  # a stale pooled connection: once more, on a new one
                raise
        raise AssertionError("unreachable")

    def _take_idle(self) -> _Connection | None:
        """An idle connection still open, if any; dead ones are dropped on the way."""
        while self._idle:
            conn = self._idle.pop()  # the most recently used is the likeliest alive
            if not conn.closed:
                return conn
        return None

    def _put(self, conn: _Connection) -> None:
        self._idle.append(conn)
        while len(self._idle) > MAX_IDLE:
            self._idle.popleft()._abort()

    def close(self) -> None:
        while self._idle:
            self._idle.pop()._abort()


async def open_stream(
    host: str,
    port: int,
    target: str,
    headers: Mapping[str, str],
    connect_timeout: float,
    idle_timeout: float,
    head_timeout: float | None = None,
) -> Response:
    """A GET for a long-lived stream, on a connection of its own.

    No head within ``head_timeout`` (default: ``idle_timeout``), or no bytes
    for ``idle_timeout`` after it, fails it with ``aiohttp.ServerTimeoutError``;
    close the response to end the stream.
    """
    head = _head("GET", target, headers)
    conn = await _connect(host, port, connect_timeout, None)
    return await _ask(conn, head, head_timeout or idle_timeout, idle_timeout)


async def _ask(
    conn: _Connection, head: bytes, header_timeout: float | None, idle_timeout: float | None = None
) -> Response:
    """Send ``head`` on ``conn``; the response, once its head has arrived."""
    response = Response(conn, header_timeout, idle_timeout)
    conn.start(response, head)
    try:
        await response._head
    except BaseException:
        # Cancelled (the client left) or failed: nobody will read this
        # answer, so its connection must not wait for it.
        response.close()
        raise
    return response


async def _connect(host: str, port: int, timeout: float, pool: Pool | None) -> _Connection:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(lambda: _Connection(pool), host, port)
    except TimeoutError:
        raise aiohttp.ServerTimeoutError(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise ConnectFailed(exc) from None
    return conn


class UnsafeHeader(ValueError):
    """A header (or the target) would carry CR, LF or NUL into the request head."""


_UNSAFE = re.compile(r"[\r\n\x00]")


def _head(method: str, target: str, headers: Mapping[str, str]) -> bytes:
    # Whatever the source of a value (a client, a store, the upstream), CR,
    # LF or NUL in it would let it write headers or requests of its own:
    # refused, as aiohttp's client refuses them.
    if _UNSAFE.search(target) or any(
        _UNSAFE.search(name) or _UNSAFE.search(value) for name, value in headers.items()
    ):
        raise UnsafeHeader("CR, LF or NUL in a request header: refused")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")
