"""The reverse proxy: every request goes to the upstream; three kinds are watched.

* **enrich** (gptme: ``GET /api/v2/conversations/{id}``, ``sidecar.proxy.enrich``):
  the upstream's 2xx JSON answer is decoded, merged with the snapshot and
  re-encoded; the **list** (``GET /api/v2/conversations``,
  ``sidecar.proxy.listing``) likewise, each observed item with its own;
* **trigger** (gptme: ``POST .../step``, ``sidecar.proxy.trigger``): before it
  is forwarded, the resource's stream is made live, so no event of the work
  it starts can be missed; its answer updates the snapshot before the client
  sees it;
* **everything else** (``sidecar.proxy.forward``), WebSocket upgrades included
  (``sidecar.proxy.websocket``), passes through: bodies are streamed both
  ways, never buffered, and bytes are never altered.

This module only routes: it names each request's kind, runs the handler,
and turns every failure into a clear answer (:meth:`Proxy.serve`), then a
metric. What a hop adds to a message and what it removes is
``sidecar.http.headers``'; asking the upstream, ``sidecar.http.upstream``'.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..core.profile import Profile
from ..http.errors import UpstreamError, error_body
from ..http.exchange import Exchange, WebExchange, is_websocket
from ..http.upstream import Upstream
from ..state.registry import Registry
from . import cache_policy
from .cache import Cache, Rendered, ResponseCache
from .counts import Counts
from .enrich import Enrich, Merger
from .fanout import FanOut, FanOutSettings
from .forward import Forward
from .listing import Listing
from .longpoll import LongPoll
from .relay import Relay
from .settings import ProxySettings
from .trigger import Triggers
from .websocket import WebSockets

__all__ = ["Proxy"]

log = logging.getLogger("sidecar.proxy")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Proxy:
    def __init__(
        self,
        settings: ProxySettings,
        profile: Profile,
        registry: Registry,
        session: aiohttp.ClientSession,
        counts: Counts,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.registry = registry
        self.counts = counts
        self.via = "sidecar"
        self.upstream = Upstream(
            URL(settings.upstream),
            session,
            connect_timeout=settings.connect_timeout,
            response_timeout=settings.response_timeout,
            max_request_body=settings.max_request_body,
            body_timeout=settings.body_timeout,
            preserve_host=settings.preserve_host,
            via=self.via,
            on_latency=counts.observe_upstream_latency,
        )
        #: How error answers name the upstream (never its userinfo, which
        #: the settings refuse anyway).
        self.shown_upstream = str(self.upstream.url.with_user(None))
        self.relay = Relay(self.via)
        self.longpoll = LongPoll(registry, settings.max_wait, settings.max_held)
        #: The event-validated response cache (see sidecar.proxy.cache), or None.
        # Request headers a cache key holds (as themselves or in the
        # credentials' fingerprint): a Vary on them is met by the key.
        in_key = frozenset(
            h.lower() for h in (*cache_policy.KEY_HEADERS, *profile.credentials.headers)
        )
        self.cache = (
            ResponseCache(
                settings.cache_max_age,
                settings.cache_max_bytes,
                in_key,
                stale=settings.cache_stale_while_revalidate,
            )
            if settings.cache == "events"
            else None
        )
        policy = (
            Cache(
                self.cache,
                key=profile.key,
                registry=registry,
                counts=counts,
                via=self.via,
                revalidations=settings.cache_revalidations,
            )
            if self.cache is not None
            else None
        )
        merger = Merger(
            key=profile.key,
            registry=registry,
            relay=self.relay,
            counts=counts,
            merge_limit=settings.merge_limit,
            max_merge_memory=settings.max_merge_memory,
        )
        self.forward = Forward(profile, registry, self.upstream, self.relay)
        #: Clients' event streams served from the subscription, or None.
        self.fanout = (
            FanOut(
                profile,
                registry,
                FanOutSettings(
                    replay_events=settings.fan_out_replay,
                    client_bytes=settings.fan_out_client_bytes,
                    live_wait=settings.trigger_wait,
                ),
                self.forward.told,
                self.via,
            )
            if settings.fan_out and profile.fan_out
            else None
        )
        self.listing = Listing(
            profile, registry, self.upstream, self.relay, counts, merger, settings.list_observe
        )
        self.enrich = Enrich(
            profile, registry, self.upstream, self.relay, counts, self.longpoll, merger, policy
        )
        self.triggers = Triggers(
            profile,
            registry,
            self.upstream,
            self.relay,
            trigger_wait=settings.trigger_wait,
            body_timeout=settings.body_timeout,
        )
        self.websockets = WebSockets(self.upstream, settings.max_ws_message)

    @property
    def large_answers(self) -> int:
        """Answers of 128 KiB or more finished (see server.HeapTrimmer)."""
        return self.relay.large_answers

    def close(self) -> None:
        if self.enrich.cache is not None:
            self.enrich.cache.close()
        self.upstream.close()

    def begin_shutdown(self) -> None:
        """End SSE passthroughs cleanly and answer held long-polls now."""
        self.relay.begin_shutdown()
        if self.fanout is not None:
            self.fanout.begin_shutdown()
        self.longpoll.closing = True
        if self.longpoll.held:
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
        # (A request without Host never gets here: aiohttp answers it 400.)
        await self.serve(exchange, path, lambda: self._work(exchange, target, path))
        if exchange.response is None:  # the client left before any answer
            return web.Response(status=exchange.status)
        return exchange.response

    def handle_get(self, exchange: Exchange, target: str, path: str) -> Awaitable[None]:
        """Serve a bodyless GET read by the front door (its target is origin-form)."""
        return self.serve(exchange, path, lambda: self._work(exchange, target, path))

    def answer_now(self, exchange: Exchange, target: str, path: str) -> Rendered | None:
        """The answer to a bodyless GET the proxy can make at once, with no
        wait of any kind (a fresh cache hit), counted as :meth:`serve`
        counts it; None: the request is served by :meth:`handle_get`."""
        route = exchange.derived.get("route")
        if route is None:
            route = exchange.derived["route"] = self.profile.route("GET", path)
        if route.kind != "enrich" or route.resource_id is None:
            return None
        answer = self.enrich.answer_now(exchange, target, route.resource_id)
        if answer is not None:
            exchange.kind = "enrich"
            self.counts.count_request("enrich", "GET", answer[0])
        return answer

    def aiohttp_path(self, path: str) -> bool:
        """A GET the front door must leave to aiohttp's server: a trigger
        (it reads a body, and only aiohttp's exchange has one)."""
        if not any(t.method == "GET" for t in self.profile.triggers):
            return False  # (nearly always: no path to read)
        return self.profile.route("GET", path).kind == "trigger"

    def _work(self, exchange: Exchange, target: str, path: str) -> Awaitable[None]:
        """The work of one request, by what it is: its path as the upstream
        reads it (sidecar.core.paths) decides, never its spelling."""
        if isinstance(exchange, WebExchange) and is_websocket(exchange.request):
            exchange.kind = "websocket"
            return self.websockets.relay(exchange, target)
        route = exchange.derived.get("route") if exchange.method == "GET" else None
        if route is None:
            route = self.profile.route(exchange.method, path)
        if route.kind == "trigger" and isinstance(exchange, WebExchange):
            assert route.trigger is not None and route.resource_id is not None
            exchange.kind = "trigger"
            return self.triggers.trigger(exchange, target, route.trigger, route.resource_id)
        if route.kind == "enrich":
            assert route.resource_id is not None
            exchange.kind = "enrich"
            return self.enrich.enrich(exchange, target, route.resource_id)
        if route.kind == "list":
            exchange.kind = "list"
            return self.listing.list(exchange, target)
        if route.kind == "create":
            return self.forward.create(exchange, target)
        if (
            route.stream
            and self.fanout is not None
            and route.resource_id is not None
            and exchange.method == "GET"
        ):
            return self._stream(exchange, target, route.resource_id)
        return self.forward.forward(
            exchange, target, route.resource_id, route.owner, stream=route.stream
        )

    async def _stream(self, exchange: Exchange, target: str, resource_id: str) -> None:
        """A client's event stream: fanned out from the subscription where it
        can be, else proxied."""
        fanout = self.fanout
        assert fanout is not None
        fleet = self.registry.fleet
        if (
            fanout.eligible(exchange)
            and not fanout.authorised(exchange, target, resource_id)
            and (fleet is None or self.registry.subscription_of(resource_id) is not None)
        ):
            # May these credentials read it? The upstream says, in its
            # answer's head; a stream it opens is closed at once.
            upstream = await self.upstream.send(exchange, target)
            if not (200 <= upstream.status < 300 and upstream.content_type == "text/event-stream"):
                await self.relay.relay(exchange, upstream)  # its refusal, as it came
                return
            upstream.close()
            client = self.profile.credentials.of(exchange.headers, target)
            self.registry.observe(resource_id, client)
        if not await fanout.serve(exchange, target, resource_id):
            await self.forward.forward(exchange, target, resource_id, None, stream=True)

    async def serve(
        self, exchange: Exchange, path: str, work: Callable[[], Awaitable[None]]
    ) -> None:
        """Run one exchange's work; every failure becomes a clear answer, then a metric.

        Routing runs inside too (``work`` makes the work), so no request's
        bytes can fail it without an answer."""
        method = exchange.method
        try:
            await work()
        except UpstreamError as exc:
            await self._error(
                exchange,
                exc.status,
                exc.message,
                upstream=self.shown_upstream,
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
        self.counts.count_request(exchange.kind, label, exchange.status)

    async def _error(self, exchange: Exchange, status: int, message: str, **extra: Any) -> None:
        if exchange.started:
            # Too late for an error answer: the cut connection tells the
            # client its answer is incomplete.
            exchange.abort()
            return
        body = error_body(message, **extra)
        headers = CIMultiDict(
            {"Content-Type": "application/json", "Content-Length": str(len(body))}
        )
        if exchange.method == "HEAD":
            body = b""  # the length a GET would get, and no body (RFC 9110 section 9.3.2)
        try:
            await exchange.respond(status, None, headers, body)
        except ConnectionResetError:
            exchange.status = 499
