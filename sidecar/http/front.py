"""The front door: a lean HTTP/1.1 server for the proxy's hot path.

Most of what a sidecar serves is small GETs from pollers, and aiohttp's
server spends more on each (request and response objects, routing, a writer,
timers) than the rest of the hop together. So the main port is served by
this module first. It reads request heads with httptools (llhttp, the parser
aiohttp itself uses) straight from an asyncio protocol, and serves a bodyless
HTTP/1.1 GET through the proxy's ``serve_get`` (``Proxy.handle_get``): the
same proxy code that aiohttp's handler runs, with the same headers, merge,
metrics and errors.

Everything else is aiohttp's: a request with a body, any other method, a
WebSocket or other upgrade, HTTP/1.0, an absolute-form target, a path the
wiring routes to aiohttp (the admin paths, a trigger that is a GET), a head
over 8 KiB, a head that repeats a field RFC 9110 allows once
(``Host``, ``Content-Length``...), a head without ``Host``, or one llhttp would
not take as it is. At the
first such request the connection is handed over, with the bytes read so far,
to a new aiohttp request handler, and it stays there. aiohttp then answers
exactly as it would have alone, malformed requests included.

What the proxy can answer with no wait at all (a fresh cache hit: the
proxy's ``answer_now``) is answered in the callback that read it, with no
task of its own, in one write; everything else runs in a task per request.
A head is parsed once: the same bytes again (a poller's next GET) are read
as they were the first time, from a memo bounded in bytes
(``KNOWN_HEADS_BYTES``), which also keeps what the proxy derived from the
head alone (its route, its credentials' fingerprint, its cache key).

Requests on one connection are answered in order, one at a time: pipelined
heads wait in the buffer, and reading pauses once it holds more than
``MAX_BUFFERED`` bytes. A client that leaves cancels its request (aiohttp's
``handler_cancellation``). Idle connections close after ``keepalive_timeout``.

Limits, as nginx has them: a request head must arrive whole within
``header_timeout`` of its first byte (of the connection, for the first one),
or the client gets a 408 and the connection closes; aiohttp's server has no
such limit, so connections handed over to it keep it (:class:`_HandedOver`).
Beyond ``max_connections`` open connections, a new one gets a 503 and is
closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools
from aiohttp import HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import error_body
from .exchange import Exchange

__all__ = ["AnswerNow", "Front", "ServeGet", "http_date", "log_access", "render_head"]

#: Serves one bodyless GET: ``(exchange, target, path)``.
ServeGet = Callable[[Exchange, str, str], Awaitable[None]]
#: The whole answer to a bodyless GET if the proxy can make it at once
#: (its status, its head as :func:`render_head` makes it, its body), else
#: None: ``(exchange, target, path)``.
AnswerNow = Callable[[Exchange, str, str], "tuple[int, bytes, bytes] | None"]

log = logging.getLogger("sidecar.front")

MAX_HEAD = 8192
MAX_HEADERS = 128  # aiohttp's limit; a request with more is handed over, and refused
MAX_BUFFERED = 64 * 1024
#: Request heads remembered as parsed (a poller sends the same head each
#: time), oldest out: at most this many bytes, counted as KNOWN_HEAD_COST
#: per byte of a head (its bytes, its target, its headers) plus
#: KNOWN_HEAD_OVERHEAD (the objects that hold them, and what the proxy
#: derives); a head over KNOWN_HEAD_MAX bytes is parsed each time.
KNOWN_HEADS_BYTES = 1024 * 1024
KNOWN_HEAD_MAX = 2048
KNOWN_HEAD_COST = 3
KNOWN_HEAD_OVERHEAD = 1500
_SWEEP_INTERVAL = 10.0
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_NO_BODY = frozenset({204, 304})
#: RFC 9110's singleton fields: a request repeating one is aiohttp's to refuse.
_SINGLETONS = frozenset(
    {
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    }
)


def log_access(
    logger: logging.Logger,
    method: str,
    path: str,
    status: int,
    seconds: float,
    body_bytes: int,
    remote: str | None,
) -> None:
    """One structured line per request: no query string, no headers, no body."""
    logger.info(
        "request",
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "bytes": body_bytes,
            "remote": remote,
        },
    )


class Front:
    """The main port's protocol factory, and the connections it serves."""

    def __init__(
        self,
        serve_get: ServeGet,
        hand_over: Callable[[], asyncio.Protocol],
        access_log: logging.Logger | None = None,
        aiohttp_path: Callable[[str], bool] = lambda path: False,
        keepalive_timeout: float = 3630.0,
        header_timeout: float = 60.0,
        max_connections: int = 10000,
        serve_gets: bool = True,
        answer_now: AnswerNow | None = None,
    ) -> None:
        """``hand_over`` makes aiohttp's protocol for a connection the front
        does not serve; a GET whose path ``aiohttp_path`` accepts is aiohttp's
        too; a connection idle for ``keepalive_timeout`` seconds is closed.
        ``answer_now`` answers what needs no wait (a cache hit) without a
        task of its own; the rest goes to ``serve_get``."""
        self.serve_get = serve_get
        self.answer_now = answer_now
        self.hand_over = hand_over
        self.access_log = access_log
        self.aiohttp_path = aiohttp_path
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        #: False: every connection goes to aiohttp at once (``front_door = false``),
        #: still with this module's limits.
        self.serve_gets = serve_gets
        self._sweep_every = min(_SWEEP_INTERVAL, keepalive_timeout / 2, header_timeout / 2)
        self.connections: set[_Connection] = set()
        #: Heads served before, by their bytes (oldest first), and their cost.
        self.known: dict[bytes, _Head] = {}
        self.known_bytes = 0
        #: Connections handed over to aiohttp and still open.
        self.handed_over: set[_HandedOver] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> asyncio.Server:
        """``reuse_port``: several processes share the port (``workers``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            backlog=1024,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)
        return self._server

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive timeout, and
        those whose request head is late."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle_deadline = now - self.keepalive_timeout
        head_deadline = now - self.header_timeout
        for conn in list(self.connections):
            if conn.task is not None:
                continue
            if conn.head_since is not None:
                if conn.head_since < head_deadline:
                    conn.refuse(408, "the request head did not arrive in time")
            elif conn.last_active < idle_deadline:
                conn.close()
        for handed in list(self.handed_over):
            if handed.head_since is not None and handed.head_since < head_deadline:
                handed.refuse(408, "the request head did not arrive in time")
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    @property
    def open_connections(self) -> int:
        return len(self.connections) + len(self.handed_over)

    def close(self) -> None:
        """Stop listening; close idle connections, and busy ones after their answer."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()

    async def drain(self, timeout: float) -> None:
        """Wait for the connections to finish, up to ``timeout``; then cut the rest."""
        if self.connections:
            self._drained = asyncio.get_running_loop().create_future()
            done, _ = await asyncio.wait([self._drained], timeout=timeout)
            if not done:
                tasks = [conn.task for conn in self.connections if conn.task is not None]
                for conn in list(self.connections):
                    conn.abort()
                await asyncio.gather(*tasks, return_exceptions=True)
        # Not Server.wait_closed(): it would also wait for the connections
        # handed over to aiohttp, which aiohttp's own shutdown drains.

    def remember(self, head: bytes, known: _Head) -> None:
        """Keep a head as read, within KNOWN_HEADS_BYTES (oldest out)."""
        if len(head) > KNOWN_HEAD_MAX:
            return
        self.known[head] = known
        self.known_bytes += len(head) * KNOWN_HEAD_COST + KNOWN_HEAD_OVERHEAD
        while self.known_bytes > KNOWN_HEADS_BYTES:
            oldest = next(iter(self.known))
            del self.known[oldest]
            self.known_bytes -= len(oldest) * KNOWN_HEAD_COST + KNOWN_HEAD_OVERHEAD

    def _forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


class _Connection(asyncio.Protocol):
    """One client connection, until it closes or is handed over to aiohttp."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.buffer = b""
        self.task: asyncio.Task[None] | None = None
        self.last_active = self.loop.time()
        self.lost = False
        #: When the request head now awaited began (None: idle, or serving).
        self.head_since: float | None = self.loop.time()
        self.reading_paused = False
        self.writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        # The head being parsed.
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._complete = False
        self._keep_alive = False
        self._refuse = False
        self._singletons_seen: set[str] = set()

    # ------------------------------------------------------ asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are one.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else str(peer) if peer else None
        if self.front.open_connections >= self.front.max_connections:
            self.refuse(503, "too many connections")
            return
        self.front.connections.add(self)
        if self.front.closing:
            self.close()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if not self.buffer and self.task is None and self.head_since is None:
            self.head_since = self.last_active  # a new request head begins
        self.buffer = self.buffer + data if self.buffer else data
        if self.task is None:
            self._next()
        elif len(self.buffer) > MAX_BUFFERED and not self.reading_paused:
            self.reading_paused = True
            self._transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._parser = None  # it holds this protocol: a cycle once the connection is gone
        self.front._forget(self)
        if self.task is not None:
            self.task.cancel()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()

    # -------------------------------------------------------------- helpers
    @property
    def _transport(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def refuse(self, status: int, message: str) -> None:
        """Answer with an error of the sidecar's own, and close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_error_answer(status, message))
        self.close()

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client left")
        if self.writing_paused:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter
            if self.lost:
                raise ConnectionResetError("the client left")

    def _wake_writer(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -------------------------------------------------------------- requests
    def _next(self) -> None:
        """Serve the buffered requests whose heads are whole: at once while
        they can be answered at once, then the next one in a task."""
        while self.buffer and self._start():
            pass

    def _start(self) -> bool:
        """Start the next buffered request once its head is whole. True: it
        was answered at once (and the next may be started)."""
        buf = self.buffer
        if not buf or self.lost:
            return False
        if self.front.closing:
            self.close()
            return False
        if not self.front.serve_gets:
            self._hand_over()
            return False
        if not buf.startswith(b"GET /"):
            if len(buf) >= 5 or not b"GET /".startswith(buf):
                self._hand_over()
            return False
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
        if end < 0:
            if len(buf) >= MAX_HEAD or b"\n\n" in buf:
                self._hand_over()
            return False
        head = buf[: end + 4]
        front = self.front
        known = front.known.get(head)
        if known is None:
            target = self._parse(head)
            if target is None:
                self._hand_over()
                return False
            path = target.partition("?")[0]
            if front.aiohttp_path(path):
                self._hand_over()
                return False
            headers = CIMultiDictProxy(CIMultiDict(self._headers))
            known = _Head(target, path, headers, self._keep_alive)
            front.remember(head, known)
        target, path = known.target, known.path
        self.buffer = buf[end + 4 :]
        self.head_since = None
        exchange = _Exchange(self, known.headers, known.keep_alive)
        exchange.derived = known.derived
        if self.front.answer_now is not None and not self.writing_paused:
            if self._answered_now(exchange, target, path):
                return self._done(exchange)
        self.task = self.loop.create_task(self._serve(exchange, target, path))
        return False

    def _answered_now(self, exchange: _Exchange, target: str, path: str) -> bool:
        """Answer at once if the proxy can (see ``Front.answer_now``)."""
        assert self.front.answer_now is not None
        started = time.perf_counter() if self.front.access_log is not None else 0.0
        try:
            answer = self.front.answer_now(exchange, target, path)
        except Exception:  # a bug: the request is served the usual way, which answers it
            log.exception("answering at once failed in the front door", extra={"path": path})
            return False
        if answer is None:
            return False
        exchange.respond_now(*answer)
        if self.front.access_log is not None:
            self._logged(exchange, path, started)
        return True

    def _parse(self, head: bytes) -> str | None:
        """The head's target if the front serves it: one bodyless HTTP/1.1 GET."""
        if head.count(b"\n") != head.count(b"\r\n"):
            return None  # bare LF line ends: aiohttp's parser decides
        self._url = b""
        self._headers = []
        self._complete = False
        self._refuse = False
        self._singletons_seen.clear()
        if self._parser is None:
            return None
        try:
            self._parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        if (
            not self._complete
            or self._refuse
            or self._parser.get_http_version() != "1.1"
            or len(self._headers) > MAX_HEADERS
            or "host" not in self._singletons_seen  # aiohttp's path refuses it (400)
        ):
            return None
        try:
            return self._url.decode("ascii")
        except UnicodeDecodeError:
            return None

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        text = name.decode("utf-8", "surrogateescape")
        lowered = text.lower()
        if lowered in _SINGLETONS:
            if lowered in self._singletons_seen:
                self._refuse = True  # aiohttp answers a duplicate with 400
            self._singletons_seen.add(lowered)
        # llhttp strips the whitespace before a value, not after it.
        self._headers.append((text, value.rstrip(b" \t").decode("utf-8", "surrogateescape")))

    def on_message_complete(self) -> None:
        self._complete = True
        # Asked here: llhttp forgets the message's flags once it has returned.
        self._keep_alive = self._parser is not None and self._parser.should_keep_alive()

    async def _serve(self, exchange: _Exchange, target: str, path: str) -> None:
        access_log = self.front.access_log
        started = time.perf_counter() if access_log is not None else 0.0
        try:
            await self.front.serve_get(exchange, target, path)
        except asyncio.CancelledError:
            # The client left, or the drain at shutdown ran out of time. The
            # task keeps this error, whose traceback holds this frame and so
            # this connection: let go of the task, or the two form a cycle
            # that keeps the answer's bytes alive until a full collection.
            self.task = None
            raise
        except Exception:  # the proxy answers its own faults: this is a bug
            log.exception("request failed in the front door", extra={"path": path})
            self.task = None
            self.abort()
            return
        self._logged(exchange, path, started)
        self.task = None
        if self._done(exchange):
            self._next()

    def _logged(self, exchange: _Exchange, path: str, started: float) -> None:
        access_log = self.front.access_log
        if access_log is not None:
            log_access(
                access_log,
                "GET",
                URL.build(path=path, encoded=True).path,
                exchange.status,
                time.perf_counter() - started,
                exchange.sent,
                self.remote,
            )

    def _done(self, exchange: _Exchange) -> bool:
        """A request was answered: True if the next may be started."""
        self.last_active = self.loop.time()
        if self.lost:
            return False
        if not exchange.complete or not exchange.keep_alive:
            self.close()
            return False
        if self.reading_paused:
            self.reading_paused = False
            self._transport.resume_reading()
        if self.buffer:
            self.head_since = self.last_active  # the next head began arriving
        return True

    def _hand_over(self) -> None:
        """Give the connection, and what it sent so far, to aiohttp's server.

        Only between requests, and every write of an answer waits for the
        transport to drain when it pauses us: aiohttp's flow control starts
        from a transport that is writing freely.
        """
        self.front._forget(self)
        transport = self._transport
        protocol = _HandedOver(self.front, self.front.hand_over(), self.head_since)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.reading_paused:
            transport.resume_reading()
        data, self.buffer = self.buffer, b""
        if data:
            protocol.data_received(data)
        self.transport = None
        self._parser = None


class _HandedOver(asyncio.Protocol):
    """aiohttp's protocol for a handed-over connection, with a head timeout.

    aiohttp's server waits for a request head as long as the connection's
    keep-alive timeout (an hour by default): a client sending one byte now
    and then holds it forever. This wrapper passes everything through and
    notes when a head began arriving on an idle connection; the front's
    sweep answers 408 if aiohttp has not parsed it within ``header_timeout``.
    """

    def __init__(self, front: Front, inner: asyncio.Protocol, head_since: float | None) -> None:
        self.front = front
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.head_since = head_since
        self._loop = asyncio.get_running_loop()

    def _parsed(self) -> int:
        return int(getattr(self.inner, "_request_count", 0))

    def _idle(self) -> bool:
        """aiohttp waits for a new request: none in progress or queued."""
        return not getattr(self.inner, "_request_in_progress", True) and not getattr(
            self.inner, "_messages", True
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.front.handed_over.add(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        before = self._parsed()
        idle = self._idle()
        self.inner.data_received(data)
        if self._parsed() != before:
            self.head_since = None  # a head arrived whole
        elif idle and self.head_since is None:
            self.head_since = self._loop.time()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.handed_over.discard(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def refuse(self, status: int, message: str) -> None:
        self.head_since = None
        if self._parsed() and not self._idle():
            return  # a request is being served after all
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_error_answer(status, message))
            self.transport.close()


def _error_answer(status: int, message: str) -> bytes:
    """A whole answer of the sidecar's own, with ``Connection: close``."""
    body = error_body(message)
    head = (
        f"HTTP/1.1 {status} {_PHRASES.get(status, '')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Date: {http_date()}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Head:
    """A request head the front door serves, as read: the same bytes are
    read the same way, so a head sent again is not parsed again (its
    headers are read-only, and ``derived`` holds what the proxy found from
    them alone: see ``Exchange.derived``)."""

    __slots__ = ("derived", "headers", "keep_alive", "path", "target")

    def __init__(
        self, target: str, path: str, headers: CIMultiDictProxy[str], keep_alive: bool
    ) -> None:
        self.target = target
        self.path = path
        self.headers = headers
        self.keep_alive = keep_alive
        self.derived: dict[str, Any] = {}


class _Exchange:
    """A GET read by the front door, and its answer (an ``Exchange``)."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_pending",
        "complete",
        "derived",
        "headers",
        "keep_alive",
        "kind",
        "remote",
        "sent",
        "status",
    )

    method = "GET"
    scheme = "http"
    version = HttpVersion11

    def __init__(self, conn: _Connection, headers: CIMultiDictProxy[str], keep_alive: bool) -> None:
        self._conn = conn
        self.headers = headers
        self.remote = conn.remote
        self.keep_alive = keep_alive
        self.kind = "pass"
        self.status = 0
        self.sent = 0  # body bytes written
        self.complete = False
        self._chunked = False
        self._pending = b""  # a head that waits to go out with the first body bytes
        self.derived: dict[str, Any] = {}

    @property
    def started(self) -> bool:
        return self.status != 0

    def body(self, limit: int, idle: float) -> None:
        return None

    def _head(
        self, status: int, reason: str | None, headers: CIMultiDict[str], extra: str
    ) -> bytes:
        self.status = status
        return self._end(render_head(status, reason, headers) + extra.encode())

    def _end(self, head: bytes) -> bytes:
        """A head from :func:`render_head` made whole for this connection."""
        if self._conn.front.closing:
            self.keep_alive = False
        return head + (b"\r\n" if self.keep_alive else b"Connection: close\r\n\r\n")

    async def respond(
        self, status: int, reason: str | None, headers: CIMultiDict[str], body: bytes
    ) -> None:
        head = self._head(status, reason, headers, "")
        self.sent = len(body)
        await self._send(head, body)
        self.complete = True

    def respond_now(self, status: int, head: bytes, body: bytes) -> None:
        """:meth:`respond` for an answer made at once: one write, no wait
        (the transport buffers what the socket does not take yet; while it
        is over its high-water mark, the next request is served in a task,
        which waits for it to drain)."""
        self.status = status
        head = self._end(head)
        self.sent = len(body)
        transport = self._conn.transport
        if transport is not None and not self._conn.lost:
            # One system call, the body not copied (uvloop sends both with
            # writev; asyncio's own transport joins them).
            transport.writelines((head, body))
        self.complete = True

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        if status in _NO_BODY or status < 200 or "Content-Length" in headers:
            # Known length: the head goes out with the first body bytes.
            self._pending = self._head(status, reason, headers, "")
            return
        self._chunked = True
        await self._send(self._head(status, reason, headers, "Transfer-Encoding: chunked\r\n"))

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.sent += len(chunk)
        if self._chunked:
            await self._send(b"%x\r\n" % len(chunk), chunk, b"\r\n")
        elif self._pending:
            head, self._pending = self._pending, b""
            await self._send(head, chunk)
        else:
            await self._send(chunk)

    async def finish(self) -> None:
        if self._chunked:
            await self._send(b"0\r\n\r\n")
        elif self._pending:
            head, self._pending = self._pending, b""
            await self._send(head)
        self.complete = True

    def abort(self) -> None:
        # Flush what was sent, then close: a short body, or a missing last
        # chunk, tells the client its answer is incomplete.
        self.keep_alive = False
        self._conn.close()

    async def _send(self, *parts: bytes) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is None or conn.lost:
            raise ConnectionResetError("the client left")
        if len(parts) == 1:
            transport.write(parts[0])
        elif sum(map(len, parts)) <= 65536:
            transport.write(b"".join(parts))
        else:
            transport.writelines(parts)
        if conn.writing_paused:
            await conn.drain()


def render_head(status: int, reason: str | None, headers: CIMultiDict[str]) -> bytes:
    """An HTTP/1.1 answer's head as the front door sends it, less its end:
    the status line and the fields, with ``Date`` unless given. The writer
    adds ``Connection: close`` where it must, then the blank line. (A head
    rendered once may be sent again within the second of its ``Date``.)"""
    phrase = reason if reason is not None else _PHRASES.get(status, "")
    lines = [f"HTTP/1.1 {status} {phrase}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if "Date" not in headers:
        lines.append(f"Date: {http_date()}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``Date`` header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]
