"""One upstream event stream, kept open: the only code here that reads SSE.

Lifecycle (``Subscription.stream`` mirrors it into snapshots)::

    connecting ──first event──▶ live ──drop / silence / error──▶ reconnecting
        │                         ▲                                  │
        │                         └─────────first event──────────────┘
        └──── 3xx/4xx other than 408/429 (refused) ──────────▶ lost (task ends)

* A connection is *live* once its first event arrives (gptme sends
  ``connected`` at once), not when headers arrive: only then is it certain the
  upstream has registered the subscriber.
* Silence longer than ``stale_after`` (three heartbeats by default) is a dead
  or half-open connection: the read times out and the stream reconnects. The
  response head must come sooner, within ``stream_head_timeout``.
* Reconnects back off exponentially with full jitter, capped; a ``retry:``
  field from the upstream raises the floor; ``Last-Event-ID`` is sent when the
  upstream gave ids (gptme does not, so a reconnect starts fresh).
* The credentials are those of the client request that opened the
  subscription (the headers and query parameters the profile names, see
  :mod:`sidecar.credentials`), or the configured one. They live only in
  this object and go only to the configured upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from yarl import URL

from ..core.credentials import Credentials
from ..core.sse import EventDecoder, ServerSentEvent
from ..http import client
from ..http.client import UpstreamResponse

__all__ = ["Backoff", "Listener", "Subscription"]

log = logging.getLogger("sidecar.subscription")


class NotAStream(Exception):
    """The upstream answered, but not with an event stream (a 5xx, or HTML)."""


class Refused(Exception):
    """The upstream refused the stream for good (e.g. 401, 404)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream refused the stream with {status}")
        self.status = status


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter."""

    base: float
    cap: float
    attempt: int = 0

    def next_delay(self, floor: float = 0.0) -> float:
        ceiling = min(self.cap, max(self.base, floor) * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return max(floor, random.uniform(ceiling / 2, ceiling))

    def reset(self) -> None:
        self.attempt = 0


class Listener(Protocol):
    """Who reads a subscription's events after the registry (the fan-out)."""

    def event(self, sub: Subscription, sse: ServerSentEvent) -> None: ...
    def ended(self, sub: Subscription) -> None: ...


class Subscription:
    def __init__(
        self,
        *,
        key: str,
        url: URL,
        session: aiohttp.ClientSession,
        credentials: Mapping[str, str],
        on_event: Callable[[Subscription, ServerSentEvent], None],
        on_stream: Callable[[Subscription, str], None],
        stale_after: float,
        connect_timeout: float,
        head_timeout: float,
        backoff: Backoff,
        max_event_bytes: int,
    ) -> None:
        self.key = key
        self.url = url
        self._session = session
        self._credentials = Credentials(credentials.items(), getattr(credentials, "query", ()))
        self._on_event = on_event
        self._on_stream = on_stream
        self._stale_after = stale_after
        self._connect_timeout = connect_timeout
        self._head_timeout = min(head_timeout, stale_after)
        self._backoff = backoff
        self.decoder = EventDecoder(max_event_bytes)
        self.stream = "connecting"
        self.connects = 0
        self.events = 0
        #: Event types (of those the profile asks about) the current
        #: connection has carried; a new connection starts empty.
        self.seen: set[str] = set()
        self.last_failure: str | None = None
        #: Which credentials this subscription uses (they go when it ends).
        self.fingerprint = self._credentials.fingerprint
        #: When the upstream refused it for good (monotonic), if it did.
        self.finished_at: float | None = None
        #: The first event of the current connection (gptme: ``connected``).
        self.first_event: ServerSentEvent | None = None
        #: Who else reads its events, after the registry (the fan-out).
        self.listeners: list[Listener] = []
        self._live: asyncio.Event | None = None  # made when someone waits for it
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"sidecar-subscription:{self.key}"
        )

    @property
    def finished(self) -> bool:
        return self._task is None or self._task.done()

    @property
    def live(self) -> bool:
        return self.stream == "live"

    async def wait_live(self, timeout: float) -> bool:
        if self.live:
            return True
        if self._live is None:
            self._live = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._live.wait(), timeout)
        return self.live

    async def close(self) -> None:
        """Stop for good; the credentials are dropped with this object."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._credentials.clear()
        self._end_listeners()

    def _end_listeners(self) -> None:
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener.ended(self)

    # -------------------------------------------------------------- loop
    def _set_stream(self, stream: str) -> None:
        if stream != self.stream:
            self.stream = stream
            if stream == "live" and self._live is not None:
                self._live.set()
                self._live = None
            self._on_stream(self, stream)

    async def _run(self) -> None:
        while True:
            try:
                await self._connect_once()
                self.last_failure = "the upstream ended the stream"
            except Refused as exc:
                self.last_failure = str(exc)
                log.warning("stream refused", extra={"key": self.key, "status": exc.status})
                self.finished_at = time.monotonic()
                self._set_stream("lost")
                self._credentials.clear()
                self._end_listeners()
                return
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, NotAStream, TimeoutError, OSError, ValueError) as exc:
                self.last_failure = _describe(exc, self._stale_after, self._head_timeout)
            if self.stream == "live":
                self._backoff.reset()
            self._set_stream("reconnecting" if self.connects else "connecting")
            retry = self.decoder.retry
            delay = self._backoff.next_delay(floor=retry / 1000 if retry is not None else 0.0)
            log.info(
                "stream down, reconnecting",
                extra={"key": self.key, "reason": self.last_failure, "delay_s": round(delay, 3)},
            )
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        headers.update(self._credentials)
        if self.decoder.last_event_id:
            headers["Last-Event-ID"] = self.decoder.last_event_id
        resp = await self._get(headers)
        try:
            if 300 <= resp.status < 500 and resp.status not in (408, 429):
                raise Refused(resp.status)  # redirects are not followed, and not retried
            if resp.status != 200:
                raise NotAStream(f"upstream answered {resp.status}")
            if resp.content_type != "text/event-stream":
                raise NotAStream(f"expected text/event-stream, got {resp.content_type}")
            self.connects += 1
            self.decoder.reset()  # a partial event of the last connection is gone
            self.seen.clear()
            first = True
            async for chunk in resp.content.iter_any():
                for event in self.decoder.feed(chunk):
                    if first:
                        self.first_event, first = event, False
                    if self.stream != "live":
                        self._set_stream("live")
                    self.events += 1
                    self._on_event(self, event)
                    for listener in self.listeners:
                        try:
                            listener.event(self, event)
                        except Exception:
                            # A fault of a reader's own: the stream goes on.
                            log.exception("a listener failed", extra={"key": self.key})
        finally:
            resp.close()

    async def _get(self, headers: dict[str, str]) -> UpstreamResponse:
        """The stream's response, once its head is in.

        The head must come within ``head_timeout``: a server that accepts
        connections before it can answer them (opencode does for its first
        moments) must not leave the sidecar blind for long. After the head,
        silence beyond ``stale_after`` is a timeout.
        """
        url = self.url
        target = self._credentials.with_query(url.raw_path_qs)  # a ?token= client's, too
        if url.scheme == "http":
            # The lean client: half the memory per idle stream of aiohttp's.
            headers["Host"] = url.raw_authority
            return await client.open_stream(
                url.raw_host or "",
                url.port or 80,
                target,
                headers,
                self._connect_timeout,
                self._stale_after,
                self._head_timeout,
            )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=self._stale_after
        )
        async with asyncio.timeout(self._connect_timeout + self._head_timeout):
            return await self._session.get(
                URL(str(url.origin()) + target, encoded=True),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )


def _describe(exc: BaseException, stale_after: float, head_timeout: float) -> str:
    if isinstance(exc, aiohttp.ServerTimeoutError) and str(exc).startswith("no response headers"):
        return f"no response headers from the upstream within {head_timeout:g} s"
    if isinstance(exc, aiohttp.ServerTimeoutError) and str(exc).startswith("connecting"):
        return str(exc)
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return f"no bytes from the upstream for {stale_after:g} s"
    if isinstance(exc, NotAStream):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
