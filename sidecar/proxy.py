"""The reverse proxy: every request goes to the upstream; three kinds are watched.

* **enrich** (gptme: ``GET /api/v2/conversations/{id}``): the upstream's 2xx
  JSON answer is decoded, merged with the snapshot and re-encoded;
* **trigger** (gptme: ``POST .../step``): before it is forwarded, the
  resource's stream is made live, so no event of the work it starts can be
  missed; its answer updates the snapshot before the client sees it;
* **everything else**, WebSocket upgrades included, passes through: bodies
  are streamed both ways, never buffered, and bytes are never altered.

What this module adds to a message and what it removes is all in
:func:`request_headers` and :func:`response_headers`.

The proxy works on an :class:`Exchange`: one request and the means to answer
it. Two servers provide one: aiohttp (:class:`WebExchange`, every kind of
request) and the front door in :mod:`sidecar.front` (bodyless HTTP/1.1 GETs,
the hot path), so a GET is proxied by the same code whichever server read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import HttpVersion, WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import http1, merge, reducer
from .cache import Baseline, Entry, Key, ResponseCache
from .config import Settings
from .http1 import UpstreamResponse
from .metrics import Metrics
from .profile import Profile, Trigger
from .registry import Conversation, Registry, client_fingerprint
from .subscription import connection_tokens

__all__ = ["Exchange", "Proxy", "WebExchange"]

log = logging.getLogger("sidecar.proxy")

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers not forwarded: hop-by-hop, the Host (rewritten), and
#: Expect (the sidecar answers ``100-continue`` itself, then streams).
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect"}
_WEBSOCKET_DROP = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
#: Bodies up to this size on a trigger are read whole (then forwarded as they
#: came) to learn the client's session id; larger ones just stream through.
TRIGGER_BODY_PEEK = 64 * 1024
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMERGED_EVERY = 60.0  # seconds between two log lines for one reason
LARGE_ANSWER = 128 * 1024  # glibc's default mmap threshold
_UNMERGED_WHY = {
    "not_json": "the upstream's answer is not JSON",
    "no_transform": "the upstream's answer says Cache-Control: no-transform",
    "encoding": "the upstream's content coding cannot be decoded here",
    "too_large": "the answer is larger than merge_limit",
    "memory": "max_merge_memory is held by answers being merged",
}


class UpstreamError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _dropped(headers: CIMultiDictProxy[str], always: frozenset[str]) -> frozenset[str]:
    """``always``, plus the headers the message's ``Connection`` names (hop-by-hop too)."""
    tokens = connection_tokens(headers)
    return always | tokens if tokens else always


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


def request_headers(
    exchange: Exchange, upstream: URL, preserve_host: bool, via: str
) -> CIMultiDict[str]:
    """The headers sent upstream: the client's, less hop-by-hop, plus forwarding."""
    client = exchange.headers
    drop = _dropped(client, _REQUEST_DROP)
    out: CIMultiDict[str] = CIMultiDict(
        [(k, v) for k, v in client.items() if k.lower() not in drop]
    )
    client_host = client.get("Host")
    if preserve_host and client_host:
        out["Host"] = client_host
    else:
        out["Host"] = upstream.raw_authority
    peer = exchange.remote or "unknown"
    prior = ", ".join(client.getall("X-Forwarded-For", ()))
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = exchange.scheme
    if client_host:
        out["X-Forwarded-Host"] = client_host
    out["Via"] = _append_via(client.getall("Via", ()), exchange.version, via)
    return out


def response_headers(upstream: UpstreamResponse, version: Any, via: str) -> CIMultiDict[str]:
    """The headers sent to the client: the upstream's, less hop-by-hop, plus Via."""
    headers = upstream.headers
    drop = _dropped(headers, HOP_BY_HOP)
    out: CIMultiDict[str] = CIMultiDict(
        [(k, v) for k, v in headers.items() if k.lower() not in drop]
    )
    out["Via"] = _append_via(headers.getall("Via", ()), version, via)
    if upstream.status == 204:
        out.popall("Content-Length", None)  # RFC 9110 section 8.6: never on a 204
    return out


def _reason(upstream: UpstreamResponse) -> str | None:
    """The upstream's reason phrase if it is one a client can be sent
    (visible ASCII and spaces), else None: the standard phrase is used."""
    reason = upstream.reason
    if reason is None or (reason.isascii() and reason.isprintable()):
        return reason
    return None


def _append_via(prior: Any, version: Any, via: str) -> str:
    hop = f"{version.major}.{version.minor} {via}"
    return f"{', '.join(prior)}, {hop}" if prior else hop


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
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None and self.response.prepared

    def body(self, limit: int, idle: float) -> AsyncIterator[bytes] | None:
        request = self.request
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        return _stream_body(request, limit, idle) if request.body_exists else None

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


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


class Proxy:
    def __init__(
        self,
        settings: Settings,
        profile: Profile,
        registry: Registry,
        session: aiohttp.ClientSession,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.registry = registry
        self.session = session
        self.metrics = metrics
        self.closing = False
        #: Upstream responses being relayed as SSE: ended on shutdown.
        self._streams: set[UpstreamResponse] = set()
        self._held = 0  # requests held by `Prefer: wait`
        self._merging = 0  # bytes held by merges until their clients take them
        self._unmerged_said: dict[str, float] = {}  # reason: when it was last logged
        #: Answers of LARGE_ANSWER bytes or more finished (see server.HeapTrimmer).
        self.large_answers = 0
        self.upstream = URL(settings.upstream)
        self._prefix = str(self.upstream.origin()) + self.upstream.raw_path.rstrip("/")
        self.via = "sidecar"
        self._header_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.response_timeout
        )
        # Bodyless GETs to a plain-http upstream take the lean client.
        self._pool = (
            http1.Pool(self.upstream.host or "", self.upstream.port or 80, settings.connect_timeout)
            if self.upstream.scheme == "http"
            else None
        )
        self._base_path = self.upstream.raw_path.rstrip("/")
        #: The event-validated response cache (see sidecar.cache), or None.
        self.cache = (
            ResponseCache(settings.cache_max_age, settings.cache_max_bytes)
            if settings.cache == "events"
            else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def begin_shutdown(self) -> None:
        """End SSE passthroughs cleanly and answer held long-polls now."""
        self.closing = True
        for upstream in list(self._streams):
            upstream.close()
        if self._held:
            for conv in self.registry.conversations():
                conv.wake_waiters()

    # ------------------------------------------------------------ routing
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve a request read by aiohttp's server."""
        exchange = WebExchange(request)
        target = request.raw_path
        if not target.startswith("/"):
            # An absolute-form target ("GET http://elsewhere/ HTTP/1.1"): only
            # its path and query are used; the upstream is always the one set.
            target = request.rel_url.raw_path_qs
        path = target.partition("?")[0]
        method = request.method
        work: Awaitable[None]
        # (A request without Host never gets here: aiohttp answers it 400.)
        if _is_websocket(request):
            exchange.kind = "websocket"
            work = self._websocket(exchange, target)
        elif (trigger := self.profile.match_trigger(method, path)) is not None:
            exchange.kind = "trigger"
            work = self._trigger(exchange, target, *trigger)
        else:
            work = self._route(exchange, target, path)
        await self.serve(exchange, path, work)
        if exchange.response is None:  # the client left before any answer
            return web.Response(status=exchange.status)
        return exchange.response

    def handle_get(self, exchange: Exchange, target: str, path: str) -> Awaitable[None]:
        """Serve a bodyless GET read by the front door (its target is origin-form)."""
        return self.serve(exchange, path, self._route(exchange, target, path))

    def _route(self, exchange: Exchange, target: str, path: str) -> Awaitable[None]:
        resource_id = self.profile.match_enrich(exchange.method, path)
        if resource_id is not None:
            exchange.kind = "enrich"
            return self._enrich(exchange, target, resource_id)
        if exchange.method == "POST" and path == self.profile.create_path:
            return self._create(exchange, target)
        # Which resource a passed-through request is for: only the stream's
        # path for a GET (a client's own SSE), any of its paths otherwise.
        if exchange.method == "GET":
            resource_id = self.profile.stream.match(path) if self.profile.stream.has_id else None
        else:
            resource_id = self.profile.match_resource(path)
        # A request that may change a resource's body (not a GET or HEAD).
        owner = None if exchange.method in ("GET", "HEAD") else self.profile.match_owner(path)
        return self._pass(exchange, target, resource_id, owner)

    async def serve(self, exchange: Exchange, path: str, work: Awaitable[None]) -> None:
        """Run one exchange's work; every failure becomes a clear answer, then a metric."""
        method = exchange.method
        try:
            await work
        except UpstreamError as exc:
            await self._error(
                exchange,
                exc.status,
                exc.message,
                upstream=str(self.upstream),
                method=method,
                path=path,
            )
            if exc.status == 408:
                exchange.abort()  # the request is incomplete: the connection cannot go on
        except ConnectionResetError:
            # The client left while its answer was written: counted as 499, as
            # nginx does ("client closed request"); nothing more to send.
            exchange.status = 499
        except Exception:
            # A fault of the sidecar itself: logged with its traceback, and
            # answered plainly; the client never sees a traceback.
            log.exception("request failed in the sidecar", extra={"method": method, "path": path})
            await self._error(exchange, 500, "the sidecar failed to handle this request")
        label = method if method in _METHODS else "OTHER"
        self.metrics.count_request(exchange.kind, label, exchange.status)

    async def _error(self, exchange: Exchange, status: int, message: str, **extra: Any) -> None:
        if exchange.started:
            # Too late for an error answer: the cut connection tells the
            # client its answer is incomplete.
            exchange.abort()
            return
        body = orjson.dumps({"error": message, "source": "sidecar", **extra})
        headers = CIMultiDict(
            {"Content-Type": "application/json", "Content-Length": str(len(body))}
        )
        if exchange.method == "HEAD":
            body = b""  # the length a GET would get, and no body (RFC 9110 section 9.3.2)
        try:
            await exchange.respond(status, None, headers, body)
        except ConnectionResetError:
            exchange.status = 499

    # ------------------------------------------------------------- upstream
    def _url(self, target: str) -> URL:
        return URL(self._prefix + target, encoded=True)

    async def _send(
        self,
        exchange: Exchange,
        target: str,
        data: Any = None,
        headers: CIMultiDict[str] | None = None,
    ) -> UpstreamResponse:
        """Send the request upstream; returns once response headers arrived."""
        if headers is None:
            headers = request_headers(
                exchange, self.upstream, self.settings.preserve_host, self.via
            )
        limit = self.settings.max_request_body
        if data is None:
            data = exchange.body(limit, self.settings.body_timeout)
        started = time.perf_counter()
        response: UpstreamResponse
        try:
            if self._pool is not None and exchange.method == "GET" and data is None:
                response = await self._pool.get(
                    self._base_path + target, headers, self.settings.response_timeout
                )
            else:
                # sock_read bounds the wait for the response headers; it is
                # lifted once they arrive, so a stream never times out.
                stalled: asyncio.Future[None] | None = None
                if isinstance(data, AsyncIterator):
                    stalled = asyncio.get_running_loop().create_future()
                    data = _watched(data, stalled)
                asking = self.session.request(
                    exchange.method,
                    self._url(target),
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    timeout=self._header_timeout,
                )
                client_response = await (
                    _unless_stalled(asking, stalled) if stalled is not None else asking
                )
                connection = client_response.connection
                if connection is not None and connection.protocol is not None:
                    connection.protocol.read_timeout = None
                    connection.protocol.start_timeout()  # cancels the pending timer
                response = client_response
        except BodyTooLarge:
            raise _too_large(limit) from None
        except BodyStalled:
            raise self._stalled() from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamError(
                504,
                f"upstream sent no response headers within {self.settings.response_timeout:g} s",
            ) from None
        except (aiohttp.ClientConnectorError, http1.ConnectFailed) as exc:
            raise UpstreamError(502, f"upstream unreachable: {exc.os_error or exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            if _caused_by(exc, BodyTooLarge):  # aiohttp wraps the body's own error
                raise _too_large(limit) from None
            if _caused_by(exc, BodyStalled):
                raise self._stalled() from None
            raise UpstreamError(502, f"upstream failed: {type(exc).__name__}: {exc}") from None
        self.metrics.observe_upstream_latency(exchange.kind, time.perf_counter() - started)
        return response

    def _stalled(self) -> UpstreamError:
        wait = self.settings.body_timeout
        return UpstreamError(408, f"the request body stalled: no bytes for {wait:g} s")

    async def _relay(
        self, exchange: Exchange, upstream: UpstreamResponse, first: bytes = b""
    ) -> None:
        """Stream the upstream's response to the client, chunk by chunk."""
        headers = response_headers(upstream, exchange.version, self.via)
        if not first and "Content-Length" in headers and isinstance(upstream, http1.Response):
            body = upstream.complete_body()
            if body is not None:  # all in already (a small answer): one write
                upstream.release()
                try:
                    await exchange.respond(upstream.status, _reason(upstream), headers, body)
                finally:
                    if len(body) >= LARGE_ANSWER:
                        self.large_answers += 1
                return
        is_stream = upstream.content_type == "text/event-stream"
        if is_stream:
            self._streams.add(upstream)
        complete = False
        try:
            await exchange.start(upstream.status, _reason(upstream), headers)
            if first:
                await exchange.write(first)
            async for chunk in upstream.content.iter_any():
                await exchange.write(chunk)
            complete = True
            await exchange.finish()
        except ConnectionResetError:
            # The client left. (aiohttp's ClientConnectionResetError is also a
            # ClientConnectionError, so this must come first.)
            pass
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            if is_stream and self.closing:
                # Shutting down: end the event stream cleanly, so the
                # client's EventSource reconnects (to another replica).
                with contextlib.suppress(ConnectionResetError):
                    await exchange.finish()
            else:
                # The upstream broke off mid-body. Ending the response normally
                # would tell the client it has it all: cut the connection.
                log.info("upstream body cut off", extra={"reason": repr(exc)})
                exchange.abort()
        finally:
            self._streams.discard(upstream)
            if complete:
                upstream.release()
            else:
                upstream.close()
            if (upstream.content_length or 0) >= LARGE_ANSWER:
                self.large_answers += 1

    # ------------------------------------------------------------ plain
    async def _pass(
        self, exchange: Exchange, target: str, resource_id: str | None, owner: str | None = None
    ) -> None:
        try:
            upstream = await self._send(exchange, target)
        finally:
            if owner is not None:
                self._write_answered(owner)  # before its client can read again
        if resource_id is not None and 200 <= upstream.status < 300:
            # The upstream accepted this client's request for the resource
            # (gptme: the PUT that creates a conversation): observe it now.
            conv = self.registry.observe(resource_id, exchange.headers)
            if exchange.method not in ("GET", "HEAD"):
                conv.changed()  # its body may have changed: served tags are stale
        await self._relay(exchange, upstream)

    def _write_answered(self, resource_id: str) -> None:
        """A request that may change the resource's body was answered (any
        status, or none): no body fetched before is reused."""
        conv = self.registry.get(resource_id)
        if conv is not None:
            conv.write_answered()

    async def _create(self, exchange: Exchange, target: str) -> None:
        """A request that creates a resource (opencode's ``POST /session``):
        the upstream's answer names it, and the sidecar observes it at once."""
        upstream = await self._send(exchange, target)
        if not 200 <= upstream.status < 300:
            await self._relay(exchange, upstream)
            return
        answer = await _read_at_most(upstream, TRIGGER_BODY_PEEK)
        if len(answer) <= TRIGGER_BODY_PEEK:
            created = _answer_field(upstream, answer, self.profile.create_id_field)
            if created is not None and self.profile.valid_id(created):
                self.registry.observe(created, exchange.headers)
        await self._relay(exchange, upstream, first=answer)

    # ------------------------------------------------------------ trigger
    async def _trigger(
        self, exchange: WebExchange, target: str, trigger: Trigger, resource_id: str
    ) -> None:
        request = exchange.request
        conv = self.registry.get(resource_id)
        if conv is not None and client_fingerprint(request.headers) in conv.authorised:
            # Known to the upstream for this client: make its stream live
            # first, so no event of the work this starts can be missed.
            conv = self.registry.observe(resource_id, request.headers)
            if not await self.registry.ensure_live(conv, self.settings.trigger_wait):
                log.warning(
                    "trigger forwarded before its stream was live",
                    extra={"resource": resource_id, "stream": conv.snapshot.stream},
                )
        else:
            conv = None  # observed only once the upstream accepts the request
        data = None
        body: dict[str, Any] = {}
        length = request.content_length
        if request.body_exists and length is not None and length <= TRIGGER_BODY_PEEK:
            try:
                async with asyncio.timeout(self.settings.body_timeout):
                    data = await request.read()  # forwarded exactly as received
            except TimeoutError:
                raise self._stalled() from None
            body = _json_object(data)
        token = reducer.trigger_token(conv.snapshot) if conv is not None else None
        try:
            upstream = await self._send(exchange, target, data=data)
        finally:
            self._write_answered(resource_id)  # a step may write to it at once
        if 200 <= upstream.status < 300:
            conv = self.registry.observe(resource_id, request.headers)
            session_id = _json_field(body, trigger.session_field)
            if session_id is not None and not self.profile.id_is_session:
                self.registry.update(conv, lambda s: reducer.learn_session(s, session_id))
            if token is None:
                token = reducer.trigger_token(conv.snapshot)
            written = self.registry.accept_trigger(conv, token, trigger, body)
            if written is not None:
                # A shared store: the answer goes once every replica's next
                # read sees the step (or store_timeout has passed).
                await self.registry.written(written)
        elif upstream.status >= 500 and trigger.error_field and conv is not None:
            answer = await self._read_small(upstream)
            if answer is not None:
                error = _answer_field(upstream, answer, trigger.error_field)
                if error is not None:
                    assert token is not None
                    now, seq = time.time(), token
                    failed = self.registry.update(
                        conv, lambda s: reducer.fail_trigger(s, seq, error, now)
                    )
                    if failed is not None:
                        await self.registry.written(failed)
                await self._relay(exchange, upstream, first=answer)
                return
        elif conv is not None and upstream.status in (401, 403):
            conv.revoke(client_fingerprint(request.headers))
        await self._relay(exchange, upstream)

    async def _read_small(self, upstream: UpstreamResponse) -> bytes | None:
        """The whole body if it is small and already bounded, else None."""
        length = upstream.content_length
        if length is None or length > TRIGGER_BODY_PEEK:
            return None
        return await _read_at_most(upstream, length)

    # ------------------------------------------------------------- enrich
    async def _enrich(self, exchange: Exchange, target: str, resource_id: str) -> None:
        """Ask the upstream (or hold first), then merge: only into what the
        upstream gave this client, and only then is the resource observed."""
        fingerprint = client_fingerprint(exchange.headers)
        conv = self.registry.get(resource_id)
        if conv is not None and fingerprint in conv.authorised:
            await self._hold_until_changed(exchange, conv)
        fill: _Fill | None = None
        if self.cache is not None:
            fill = await self._from_cache(exchange, target, conv, fingerprint)
            if fill is None:
                return  # answered from the cache
        try:
            await self._ask_and_merge(exchange, target, resource_id, conv, fingerprint, fill)
        finally:
            if fill is not None and fill.future is not None:
                assert self.cache is not None
                self.cache.fetched(fill.key, fill.future, fill.stored)

    async def _ask_and_merge(
        self,
        exchange: Exchange,
        target: str,
        resource_id: str,
        conv: Conversation | None,
        fingerprint: str,
        fill: _Fill | None,
    ) -> None:
        headers = request_headers(exchange, self.upstream, self.settings.preserve_host, self.via)
        # A shared store: its snapshot is read while the upstream answers.
        shared = self.registry.fetch_soon(resource_id)
        for _attempt in range(2):
            epoch = conv.epoch if conv is not None else None
            inm = exchange.headers.get("If-None-Match")
            if inm is not None:
                current = conv.served if conv is not None else ()
                translated = merge.translate_if_none_match(inm, current)
                if translated is None:
                    headers.popall("If-None-Match", None)
                else:
                    headers["If-None-Match"] = translated
            revalidating = fill is not None and fill.validate("If-None-Match" not in headers)
            if revalidating:
                assert fill is not None and fill.entry is not None and fill.entry.upstream_tag
                headers["If-None-Match"] = fill.entry.upstream_tag
            upstream = await self._send(exchange, target, headers=headers)
            if not (200 <= upstream.status < 300 or upstream.status == 304):
                if conv is not None and upstream.status in (401, 403):
                    conv.revoke(fingerprint)
                self.metrics.count_merge("not_2xx")
                await self._relay(exchange, upstream)
                return
            conv = self.registry.observe(resource_id, exchange.headers, fingerprint)
            if epoch is None:
                epoch = conv.epoch  # first seen now: nothing changed since it was asked
            if shared is not None:
                await self.registry.fetched(conv, shared)
                shared = None
            if upstream.status != 304:
                if revalidating:
                    self.cache_counts("revalidated", "modified")
                await self._merge_response(exchange, upstream, conv, epoch, fill)
                return
            if revalidating:
                assert fill is not None and fill.entry is not None and fill.baseline is not None
                assert self.cache is not None
                upstream.release()
                self.cache_counts("revalidated", "not_modified")
                entry = fill.entry
                self.cache.refreshed(entry, fill.baseline)
                if self._unusable(entry, self._baseline(conv), exchange) is None:
                    fill.stored = entry
                    await self._serve_entry(exchange, conv, entry, fill.status(stored=True))
                    return
                headers.popall("If-None-Match", None)
                fill.entry = None  # an event came meanwhile: ask for the body
                continue
            if conv.epoch == epoch:
                await self._not_modified(exchange, upstream, conv)
                return
            # The state changed while the upstream answered 304: ask again
            # without the condition, so the client gets the new state.
            upstream.release()
            headers.popall("If-None-Match", None)
        raise AssertionError("unreachable: the second attempt is unconditional")

    # -------------------------------------------------------------- cache
    def cache_counts(self, result: str, reason: str) -> None:
        assert self.cache is not None
        self.cache.counts[(result, reason)] += 1

    def _baseline(self, conv: Conversation | None) -> Baseline | None:
        """What an answer asked for now is valid under, if its resource's
        stream is this process's and live (see sidecar.cache)."""
        sub = conv.subscription if conv is not None else None
        if conv is None or sub is None or sub.stream != "live":
            return None
        return Baseline(conv.version, sub, sub.connects)

    def _unusable(self, entry: Entry, baseline: Baseline | None, exchange: Exchange) -> str | None:
        """Why ``entry`` cannot answer this request under ``baseline`` (the
        conversation's now, see :meth:`_baseline`), or None if it can."""
        assert self.cache is not None
        if baseline is None or baseline.sub is not entry.baseline.sub:
            return "stream"
        if baseline.connects != entry.baseline.connects:
            return "stream"
        if baseline.version != entry.baseline.version:
            return "content"
        if self.cache.age(entry) >= self.cache.max_age:
            return "expired"
        for name, value in entry.vary:
            if exchange.headers.get(name) != value:
                return "vary"
        return None

    async def _from_cache(
        self, exchange: Exchange, target: str, conv: Conversation | None, fingerprint: str
    ) -> _Fill | None:
        """Answer from the cache if it may; else how to fill it (None: answered)."""
        cache = self.cache
        assert cache is not None
        key: Key = (target, fingerprint, exchange.headers.get("Accept-Encoding", ""))
        baseline = self._baseline(conv)
        directives = _directives(exchange.headers)
        if baseline is None or conv is None:
            cache.counts[("bypass", "not_live")] += 1
            return _Fill(cache, key, None, "bypass", "not_live", store=False)
        store = "no-store" not in directives
        entry = cache.get(key)
        authorised = fingerprint in conv.authorised
        if "no-cache" in directives or "max-age=0" in directives:
            cache.counts[("bypass", "no_cache")] += 1
            return _Fill(cache, key, baseline, "request", "no_cache", store, entry)
        if not authorised:
            # The upstream refused these credentials since, or never saw them.
            cache.counts[("bypass", "unauthorised")] += 1
            return _Fill(cache, key, baseline, "bypass", "unauthorised", store)
        why = "absent" if entry is None else self._unusable(entry, baseline, exchange)
        if why is None:
            assert entry is not None
            cache.counts[("hit", "fresh")] += 1
            await self._serve_entry(exchange, conv, entry, _hit_status(cache, entry))
            return None
        pending = cache.pending(key, baseline)
        if pending is not None:
            # Another request asks the upstream for this answer now, under
            # the same baseline: its answer is as good as a new one.
            shared = await asyncio.shield(pending)
            # The baseline again: the stream or the body may have changed meanwhile.
            now = self._baseline(conv)
            if shared is not None and self._unusable(shared, now, exchange) is None:
                cache.counts[("hit", "collapsed")] += 1
                await self._serve_entry(
                    exchange, conv, shared, _hit_status(cache, shared) + "; detail=collapsed"
                )
                return None
        cache.counts[("miss", why)] += 1
        fill = _Fill(cache, key, baseline, _FORWARD.get(why, "stale"), why, store, entry)
        if store:
            fill.future = cache.fetching(key, baseline)
        return fill

    async def _serve_entry(
        self, exchange: Exchange, conv: Conversation, entry: Entry, cache_status: str
    ) -> None:
        """Answer with a cached body, merged with the snapshot as it is now."""
        assert self.cache is not None
        snap = conv.snapshot
        if entry.merged_for is not snap:
            merged = merge.merge(entry.body, self.profile.key, snap)
            self.cache.remerged(entry, snap, merge.encode_body(merged, entry.encoding))
        out = entry.merged
        headers = entry.headers.copy()
        headers["Via"] = _append_via(entry.prior_via, exchange.version, self.via)
        epoch = conv.epoch
        version = f"{self.registry.nonce}{epoch:x}"
        digest = merge.body_digest(entry.upstream_tag, snap, version, entry.upstream_length)
        headers["ETag"] = merge.merged_etag(entry.upstream_tag, digest)
        headers["Age"] = str(int(self.cache.age(entry)))
        headers["Cache-Status"] = cache_status
        conv.remember_served(digest, epoch)
        self.metrics.count_merge("merged")
        inm = exchange.headers.get("If-None-Match")
        if inm is not None and digest in merge.etag_digests(inm):
            # The client has this very answer: no content event, no write and
            # no change of the snapshot since it was served.
            headers.popall("Content-Length", None)
            await exchange.respond(304, None, headers, b"")
            return
        headers["Content-Length"] = str(len(out))
        await exchange.respond(entry.status, entry.reason, headers, out)

    async def _hold_until_changed(self, exchange: Exchange, conv: Conversation) -> None:
        """``Prefer: wait=N`` with an If-None-Match of the current body (RFC 7240).

        The request is held until the snapshot or the resource changes, or N
        seconds pass, then answered as usual: push-like latency for a plain
        REST client. A tag that is not current (another body was served since,
        or the sidecar never served it) is answered at once.
        """
        if "Prefer" not in exchange.headers:
            return
        wait = _prefer_wait(exchange.headers.getall("Prefer", ()))
        inm = exchange.headers.get("If-None-Match")
        if wait is None or inm is None or self.closing or self._held >= self.settings.max_held:
            return
        if merge.etag_digests(inm).isdisjoint(conv.served):
            return  # the client has not seen the current body: answer now
        self._held += 1
        try:
            await conv.wait_changed(min(wait, self.settings.max_wait))
        finally:
            self._held -= 1

    async def _not_modified(
        self, exchange: Exchange, upstream: UpstreamResponse, conv: Conversation
    ) -> None:
        headers = response_headers(upstream, exchange.version, self.via)
        upstream_tag = upstream.headers.get("ETag")
        digest = merge.body_digest(upstream_tag, conv.snapshot, "", None)
        headers["ETag"] = merge.merged_etag(upstream_tag, digest)
        upstream.release()
        await exchange.respond(304, _reason(upstream), headers, b"")

    async def _merge_response(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        conv: Conversation,
        epoch: int,
        fill: _Fill | None = None,
    ) -> None:
        encoding = upstream.headers.get("Content-Encoding", "")
        cache_control = upstream.headers.get("Cache-Control", "").lower()
        length = upstream.content_length
        limit = self.settings.merge_limit
        skip = None
        if upstream.status == 204:
            self.metrics.count_merge("not_2xx")  # no body to merge into: nothing to say
            await self._relay(exchange, upstream)
            return
        if not _is_json(upstream.content_type):
            skip = "not_json"
        elif "no-transform" in cache_control:
            skip = "no_transform"
        elif not merge.supported_encoding(encoding):
            skip = "encoding"
        elif length is not None and length > limit:
            skip = "too_large"
        if skip is not None:
            self._unmerged(skip, conv.id)
            await self._relay(exchange, upstream)
            return
        held = length if length is not None else limit
        if self._merging + held > self.settings.max_merge_memory:
            # Merged answers are held until the client has taken them: many
            # large ones to slow clients would otherwise exhaust memory.
            upstream.close()
            self._unmerged("memory", conv.id)
            raise UpstreamError(
                503, "too many large answers are being merged at once (max_merge_memory)"
            )
        self._merging += held
        try:
            await self._merge_held(exchange, upstream, conv, epoch, encoding, limit, fill)
        finally:
            self._merging -= held
            if held >= LARGE_ANSWER:
                self.large_answers += 1

    async def _merge_held(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        conv: Conversation,
        epoch: int,
        encoding: str,
        limit: int,
        fill: _Fill | None,
    ) -> None:
        body = await _read_at_most(upstream, limit)
        if len(body) > limit:  # a chunked body larger than the limit
            self._unmerged("too_large", conv.id)
            await self._relay(exchange, upstream, first=body)
            return
        snap = conv.snapshot
        try:
            decoded = merge.decode_body(body, encoding, limit)
            merged = merge.merge(decoded, self.profile.key, snap)
            out = merge.encode_body(merged, encoding)
        except (merge.MergeError, OSError, ValueError) as exc:
            self._unmerged("invalid", conv.id, str(exc))
            await self._relay(exchange, upstream, first=body)
            return
        self.metrics.count_merge("merged")
        headers = response_headers(upstream, exchange.version, self.via)
        headers["Content-Length"] = str(len(out))  # known: headers go out with the body
        headers.popall("Content-MD5", None)
        upstream_tag = upstream.headers.get("ETag")
        digest = merge.body_digest(upstream_tag, snap, f"{self.registry.nonce}{epoch:x}", len(body))
        headers["ETag"] = merge.merged_etag(upstream_tag, digest)
        conv.remember_served(digest, epoch)
        upstream.release()
        if fill is not None:
            stored = fill.keep(upstream, exchange, headers, decoded, encoding, len(body), snap, out)
            headers["Cache-Status"] = fill.status(stored)
        del body, decoded, merged  # only the answer is held while the client reads it
        await exchange.respond(upstream.status, _reason(upstream), headers, out)

    def _unmerged(self, reason: str, resource: str, detail: str | None = None) -> None:
        """A 2xx answer the client gets without the snapshot: counted, and
        said in the log once per reason per minute (a metric alone is easy
        to miss; a line per request would flood)."""
        self.metrics.count_merge(reason)
        now = time.monotonic()
        if now - self._unmerged_said.get(reason, -UNMERGED_EVERY) >= UNMERGED_EVERY:
            self._unmerged_said[reason] = now
            log.warning(
                "answer passed without the snapshot",
                extra={
                    "reason": reason,
                    "why": detail or _UNMERGED_WHY.get(reason, reason),
                    "resource": resource,
                    "next_said_in_s": UNMERGED_EVERY,
                },
            )

    # ---------------------------------------------------------- websocket
    async def _websocket(self, exchange: WebExchange, target: str) -> None:
        request = exchange.request
        headers = request_headers(exchange, self.upstream, self.settings.preserve_host, self.via)
        for name in _WEBSOCKET_DROP:
            headers.popall(name, None)
        protocols = [
            p.strip()
            for v in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in v.split(",")
            if p.strip()
        ]
        url = self._url(target)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        try:
            async with asyncio.timeout(self.settings.response_timeout):
                upstream_ws = await self.session.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    autoping=False,
                    max_msg_size=self.settings.max_ws_message,
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamError(
                exc.status, f"upstream refused the WebSocket: {exc.message}"
            ) from None
        except TimeoutError:
            raise UpstreamError(504, "upstream did not accept the WebSocket in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(502, f"upstream unreachable: {exc.os_error or exc}") from None
        client_ws = web.WebSocketResponse(
            protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
            autoping=False,
            max_msg_size=self.settings.max_ws_message,
        )
        exchange.response = client_ws
        exchange.status = 101
        await client_ws.prepare(request)

        async def pump(src: Any, dst: Any) -> None:
            async for msg in src:
                if msg.type == WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == WSMsgType.PONG:
                    await dst.pong(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    # A message over max_ws_message, or a protocol error: the
                    # sender is told why (1009 for the size), the other side
                    # that this end is going away.
                    await src.close(code=getattr(msg.data, "code", WSCloseCode.INTERNAL_ERROR))
                    await dst.close(code=WSCloseCode.GOING_AWAY)
                    return
            await dst.close(code=src.close_code or 1000)

        tasks = [
            asyncio.create_task(pump(client_ws, upstream_ws)),
            asyncio.create_task(pump(upstream_ws, client_ws)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await upstream_ws.close()
            await client_ws.close()


# ------------------------------------------------------------------ helpers


#: RFC 9211's ``fwd`` parameter for each reason of a miss.
_FORWARD = {"absent": "uri-miss", "vary": "vary-miss"}
#: Request headers already in a cache key (Accept-Encoding) or its
#: credentials fingerprint (Authorization, Cookie).
_IN_KEY = frozenset({"accept-encoding", "authorization", "cookie"})


class _Fill:
    """An enrich GET the cache could not answer: why, and how its answer may
    be kept (taken before the upstream is asked, see sidecar.cache)."""

    __slots__ = ("baseline", "cache", "detail", "entry", "future", "fwd", "key", "store", "stored")

    def __init__(
        self,
        cache: ResponseCache,
        key: Key,
        baseline: Baseline | None,
        fwd: str,
        detail: str,
        store: bool,
        entry: Entry | None = None,
    ) -> None:
        self.cache = cache
        self.key = key
        self.baseline = baseline
        self.fwd = fwd
        self.detail = detail
        self.store = store and baseline is not None
        #: An entry the upstream may confirm with a 304 to its validator.
        self.entry = entry
        self.future: asyncio.Future[Entry | None] | None = None
        self.stored: Entry | None = None

    def validate(self, no_client_tag: bool) -> bool:
        """Ask the upstream with the entry's validator (when the client sent none)."""
        return no_client_tag and self.entry is not None and bool(self.entry.upstream_tag)

    def status(self, stored: bool) -> str:
        """The ``Cache-Status`` of the answer (RFC 9211)."""
        return f"sidecar; fwd={self.fwd}; detail={self.detail}" + ("; stored" if stored else "")

    def keep(
        self,
        upstream: UpstreamResponse,
        exchange: Exchange,
        headers: CIMultiDict[str],
        decoded: bytes,
        encoding: str,
        length: int,
        snap: Any,
        out: bytes,
    ) -> bool:
        """Keep a merged 200 if the upstream lets it be stored."""
        if not self.store or self.baseline is None or upstream.status != 200:
            return False
        if "no-store" in _directives(upstream.headers, pragma=False):
            return False
        if "Set-Cookie" in upstream.headers:
            return False  # an answer for one client, whatever its credentials
        names = [
            n.strip().lower() for v in upstream.headers.getall("Vary", ()) for n in v.split(",")
        ]
        if "*" in names:
            return False
        kept = headers.copy()
        for name in ("Via", "ETag", "Content-Length", "Cache-Status", "Age"):
            kept.popall(name, None)
        entry = Entry(
            key=self.key,
            baseline=self.baseline,
            stored_at=time.monotonic(),
            status=upstream.status,
            reason=_reason(upstream),
            headers=kept,
            prior_via=tuple(upstream.headers.getall("Via", ())),
            body=decoded,
            encoding=encoding,
            upstream_tag=upstream.headers.get("ETag"),
            upstream_length=length,
            vary=tuple(
                (n, exchange.headers.get(n)) for n in dict.fromkeys(names) if n and n not in _IN_KEY
            ),
            merged_for=snap,
            merged=out,
        )
        if self.cache.put(entry):
            self.stored = entry
        return self.stored is not None


def _directives(headers: Any, pragma: bool = True) -> set[str]:
    """Cache-Control directives (and ``Pragma: no-cache``), lower case."""
    found = {
        d.strip().lower().replace(" ", "")
        for v in headers.getall("Cache-Control", ())
        for d in v.split(",")
    }
    if pragma and "no-cache" in (v.strip().lower() for v in headers.getall("Pragma", ())):
        found.add("no-cache")
    return found


def _hit_status(cache: ResponseCache, entry: Entry) -> str:
    ttl = max(0, int(cache.max_age - cache.age(entry)))
    return f"sidecar; hit; ttl={ttl}"


def _is_websocket(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in _dropped(request.headers, frozenset())
    )


class BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError(413, f"request body larger than the limit of {limit} bytes")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class BodyStalled(Exception):
    pass


async def _watched(
    body: AsyncIterator[bytes], stalled: asyncio.Future[None]
) -> AsyncIterator[bytes]:
    """The body, telling ``stalled`` if it stops arriving (aiohttp's client
    would otherwise wait for the upstream's answer to a body it never sent)."""
    try:
        async for chunk in body:
            yield chunk
    except BodyStalled:
        if not stalled.done():
            stalled.set_result(None)
        raise


async def _unless_stalled(asking: Awaitable[Any], stalled: asyncio.Future[None]) -> Any:
    request = asyncio.ensure_future(asking)
    try:
        await asyncio.wait([request, stalled], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        request.cancel()
        raise
    if not request.done():
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, BodyStalled):
            await request
        raise BodyStalled
    stalled.cancel()
    return request.result()


async def _stream_body(request: web.Request, limit: int, idle: float) -> AsyncIterator[bytes]:
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


def _prefer_wait(values: Any) -> float | None:
    """The ``wait`` preference of ``Prefer`` headers (RFC 7240), if any."""
    for value in values:
        for pref in value.split(","):
            name, _, arg = pref.strip().partition("=")
            if name.strip().lower() == "wait":
                try:
                    seconds = float(arg.strip().strip('"').split(";")[0])
                except ValueError:
                    return None
                return seconds if seconds > 0 else None
    return None


async def _read_at_most(upstream: UpstreamResponse, limit: int) -> bytes:
    """Read the body, stopping once it is known to exceed ``limit``."""
    if isinstance(upstream, http1.Response):
        body = upstream.complete_body()  # a small answer is often all in already
        if body is not None:
            return body
    parts = []
    size = 0
    async for chunk in upstream.content.iter_any():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(parts)


def _answer_field(upstream: UpstreamResponse, answer: bytes, name: str | None) -> str | None:
    """A string field of a small JSON answer, decoded first if compressed."""
    try:
        encoding = upstream.headers.get("Content-Encoding", "")
        decoded = merge.decode_body(answer, encoding, TRIGGER_BODY_PEEK * 16)
    except (merge.MergeError, OSError, ValueError):
        return None
    return _json_field(_json_object(decoded), name)


def _json_object(body: bytes) -> dict[str, Any]:
    """A JSON object body, or {} for anything else."""
    if not body:
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _json_field(doc: dict[str, Any], name: str | None) -> str | None:
    if not name:
        return None
    value = reducer.field_value(doc, name)
    return value if isinstance(value, str) and value else None
