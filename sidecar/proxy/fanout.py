"""Fan-out: a resource's event stream served to every client from the sidecar's own subscription.

With ``fan_out`` (on where the profile says it is verified: gptme), a
client's GET of a resource's stream path costs the upstream nothing: the
sidecar already reads that stream (``sidecar.state.subscription``). The
client gets, in order:

1. the first event of the subscription's current connection (gptme's
   ``connected``, naming the sidecar's session), told as a late joiner is
   told (``[stream.join]``, ``sidecar.core.join``);
2. every event the subscription reads from then on, as the upstream sent it
   (its ``event:`` and ``data:`` lines; comments and ``retry:`` are the
   sidecar's own business), each with an ``id:`` of the sidecar's.

**Resume.** An id is ``<epoch>-<n>``: the hub's epoch (new with each
subscription, so with each process) and the event's number in it. The hub
keeps the last ``replay_events`` events (at most ``replay_bytes``, and all
hubs together at most ``replay_total_bytes``); a client
that comes back with ``Last-Event-ID`` gets exactly those after its id, in
order, and nothing twice. An id the buffer no longer holds, or of another
epoch, gets the current first event (as a late joiner) and then an event of
type ``sidecar-resync`` (an SSE ``event:`` name, which an EventSource's
``onmessage`` ignores) saying so.

**Slow clients.** Each client has its own queue, bounded by
``client_bytes``; one that does not read is dropped (its connection
closed) when its queue would pass the bound. Nothing waits on a client: the
subscription and the other clients go on.

A request is fanned out only when the conversation is authorised for the
client's credentials (the upstream answered them a 2xx for it before; if
not, the router asks the upstream with the client's own request and closes
the stream it opens as soon as its head says 2xx), the subscription is this
process's own and live, and the request is not cross-origin (an ``Origin``
header: the upstream's CORS answer is its own). Anything else is proxied as
before (``sidecar.proxy.forward``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

from multidict import CIMultiDict

from ..core.profile import Profile
from ..core.sse import ServerSentEvent
from ..http.exchange import Exchange
from ..http.headers import append_via
from ..state.registry import Registry
from ..state.subscription import Subscription

__all__ = ["FanOut", "FanOutSettings", "Hub", "render"]

log = logging.getLogger("sidecar.fanout")

RESYNC = "sidecar-resync"


@dataclass(frozen=True)
class FanOutSettings:
    replay_events: int = 1000
    replay_bytes: int = 1024 * 1024
    client_bytes: int = 4 * 1024 * 1024
    #: How long a client's request waits for the stream to be live.
    live_wait: float = 2.0
    #: The replay buffers of all hubs together: past it, the hub holding the
    #: most lets its oldest events go (one hub per subscription, up to
    #: max_subscriptions of them, would otherwise hold replay_bytes each).
    replay_total_bytes: int = 64 * 1024 * 1024


class _Budget:
    """Bytes the replay buffers of every hub hold together, and the hubs."""

    __slots__ = ("held", "hubs")

    def __init__(self) -> None:
        self.held = 0
        self.hubs: set[Hub] = set()


def render(sse: ServerSentEvent, event_id: str | None = None) -> bytes:
    """An event's bytes as the upstream sent them (its id: ``event_id``)."""
    parts = []
    if event_id is not None:
        parts.append(f"id: {event_id}\n")
    if sse.event != "message":
        parts.append(f"event: {sse.event}\n")
    for line in sse.data.split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()


class Client:
    """One fanned-out client: its queue, bounded in bytes, and its writes.

    An event for a client that has nothing queued is written at once, in
    the subscription's callback, when the connection takes it without
    waiting (the usual case: no task wakes per client per event); a write
    that must wait for the connection to drain is finished by the
    client's own task (:meth:`run`), and what comes meanwhile is queued."""

    __slots__ = (
        "_bound",
        "_idle",
        "_queue",
        "_size",
        "_waiting",
        "_wake",
        "dropped",
        "ended",
        "exchange",
    )

    def __init__(self, exchange: Exchange, bound: int) -> None:
        self.exchange = exchange
        self._bound = bound
        self._queue: deque[bytes] = deque()
        self._size = 0
        self._wake = asyncio.Event()
        #: Its task waits for something to write (nothing queued, nothing unfinished).
        self._idle = False
        #: A write begun in a callback that waits for the connection to drain.
        self._waiting: tuple[Coroutine[Any, Any, None], Any] | None = None
        self.dropped = False
        self.ended = False

    def put(self, data: bytes) -> None:
        if self.dropped or self.ended:
            return
        if self._idle and self._waiting is None:
            coro = self.exchange.write(data)
            try:
                yielded = coro.send(None)
            except StopIteration:
                return  # written at once
            except Exception:  # the client left (ConnectionResetError), or worse
                self.drop()
                return
            self._waiting = (coro, yielded)  # the task finishes it
            self._wake.set()
            return
        if self._size + len(data) > self._bound:
            self.drop()
            return
        self._queue.append(data)
        self._size += len(data)
        self._wake.set()

    def drop(self) -> None:
        """It does not read: its queue goes, and its connection."""
        self.dropped = True
        self._queue.clear()
        self._size = 0
        self._wake.set()
        self.exchange.abort()

    def end(self) -> None:
        """The stream ends (the subscription did, or the sidecar shuts down)."""
        self.ended = True
        self._wake.set()

    async def run(self) -> None:
        """Write what comes until the stream is over (dropped or ended)."""
        try:
            while True:
                if self._waiting is not None:
                    await self._finish_waiting()
                    continue
                if self.dropped:
                    return
                if self._queue:
                    data = b"".join(self._queue)
                    self._queue.clear()
                    self._size = 0
                    await self.exchange.write(data)
                    continue
                if self.ended:
                    return
                self._wake.clear()
                self._idle = True
                try:
                    await self._wake.wait()
                finally:
                    self._idle = False
        finally:
            if self._waiting is not None:
                self._waiting[0].close()
                self._waiting = None

    async def _finish_waiting(self) -> None:
        assert self._waiting is not None
        coro, yielded = self._waiting
        loop = asyncio.get_running_loop()
        while True:
            if isinstance(yielded, asyncio.Future):
                # What the write waits for, as a task would wait for it.
                yielded._asyncio_future_blocking = False
                if not yielded.done():
                    waiter: asyncio.Future[None] = loop.create_future()
                    yielded.add_done_callback(partial(_settle, waiter))
                    await waiter
            else:
                await asyncio.sleep(0)
            try:
                yielded = coro.send(None)
            except StopIteration:
                break
            self._waiting = (coro, yielded)
        self._waiting = None


def _settle(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Hub:
    """One subscription's events, numbered, buffered and handed to its clients."""

    def __init__(
        self,
        sub: Subscription,
        settings: FanOutSettings,
        tell_first: Callable[[bytes], bytes | None],
        budget: _Budget | None = None,
    ) -> None:
        self.sub = sub
        self._budget = budget if budget is not None else _Budget()
        self._budget.hubs.add(self)
        self.epoch = secrets.token_hex(4)
        self.settings = settings
        self._tell_first = tell_first
        self.seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._buffer_bytes = 0
        self.clients: set[Client] = set()
        self.dropped = 0
        self.events = 0
        sub.listeners.append(self)

    # ------------------------------------------------- from the subscription
    def event(self, sub: Subscription, sse: ServerSentEvent) -> None:
        self.seq += 1
        self.events += 1
        if sse is sub.first_event:
            # A new connection's first event (gptme: a new session): told as
            # a late joiner would be, for every client alike.
            block = self._told(render(sse))
            data = b"id: " + self.event_id(self.seq).encode() + b"\n" + block
        else:
            data = render(sse, self.event_id(self.seq))
        self._keep(self.seq, data)
        for client in list(self.clients):
            client.put(data)
            if client.dropped:
                self._lost(client)

    def ended(self, sub: Subscription) -> None:
        for client in list(self.clients):
            client.end()
        self.clients.clear()

    # ------------------------------------------------------------ clients
    def event_id(self, seq: int) -> str:
        return f"{self.epoch}-{seq}"

    def join(self, client: Client, last_event_id: str | None) -> None:
        """Queue what the client gets first, then add it to those that get
        every event (in one callback: nothing falls between)."""
        missed = self._missed(last_event_id) if last_event_id else None
        if missed is not None:
            for data in missed:
                client.put(data)
        else:
            first = self.sub.first_event
            if first is not None:
                block = self._told(render(first))
                client.put(b"id: " + self.event_id(self.seq).encode() + b"\n" + block)
            if last_event_id:
                body = f'{{"type":"{RESYNC}","last_event_id":"{_quoted(last_event_id)}"}}'
                client.put(f"event: {RESYNC}\ndata: {body}\n\n".encode())
        if client.dropped:
            self.dropped += 1
            return
        self.clients.add(client)

    def leave(self, client: Client) -> None:
        self.clients.discard(client)

    def _lost(self, client: Client) -> None:
        self.clients.discard(client)
        self.dropped += 1
        log.info("a fanned-out client that did not read was dropped", extra={"key": self.sub.key})

    def _missed(self, last_event_id: str) -> list[bytes] | None:
        """The buffered events after ``last_event_id``; None if the buffer
        cannot say (another epoch, too old, malformed)."""
        epoch, _, number = last_event_id.strip().rpartition("-")
        if epoch != self.epoch or not number.isdigit():
            return None
        seen = int(number)
        if seen > self.seq:
            return None
        if seen == self.seq:
            return []
        oldest = self._buffer[0][0] if self._buffer else self.seq + 1
        if seen + 1 < oldest:
            return None  # some were dropped from the buffer
        return [data for n, data in self._buffer if n > seen]

    def _keep(self, seq: int, data: bytes) -> None:
        buffer = self._buffer
        budget = self._budget
        buffer.append((seq, data))
        self._buffer_bytes += len(data)
        budget.held += len(data)
        settings = self.settings
        while buffer and (
            len(buffer) > settings.replay_events or self._buffer_bytes > settings.replay_bytes
        ):
            self._forget_oldest()
        while budget.held > settings.replay_total_bytes:
            max(budget.hubs, key=lambda hub: hub._buffer_bytes)._forget_oldest()

    def _forget_oldest(self) -> None:
        _, old = self._buffer.popleft()
        self._buffer_bytes -= len(old)
        self._budget.held -= len(old)

    def release(self) -> None:
        """The hub is gone: its buffer no longer counts."""
        self._budget.held -= self._buffer_bytes
        self._budget.hubs.discard(self)
        self._buffer.clear()
        self._buffer_bytes = 0

    def _told(self, block: bytes) -> bytes:
        try:
            told = self._tell_first(block)
        except Exception:
            log.exception("the first event of a stream could not be told")
            told = None
        return block if told is None else told


def _quoted(value: str) -> str:
    return "".join(c for c in value if c.isalnum() or c in "-_.")[:64]


class FanOut:
    """The hubs of this process's subscriptions, made when a client first needs one."""

    def __init__(
        self,
        profile: Profile,
        registry: Registry,
        settings: FanOutSettings,
        tell: Callable[[str, bytes], bytes | None],
        via: str,
    ) -> None:
        self.profile = profile
        self.registry = registry
        self.settings = settings
        self._tell = tell
        self.via = via
        self.hubs: dict[str, Hub] = {}
        self.budget = _Budget()
        self.closing = False
        self.served = 0

    def clients(self) -> int:
        return sum(len(h.clients) for h in self.hubs.values())

    def begin_shutdown(self) -> None:
        self.closing = True
        for hub in list(self.hubs.values()):
            hub.ended(hub.sub)

    def _hub(self, resource_id: str) -> Hub | None:
        sub = self.registry.subscription_of(resource_id)
        if sub is None or sub.finished:
            return None
        hub = self.hubs.get(resource_id)
        if hub is not None and hub.sub is sub:
            return hub
        if hub is not None:
            hub.ended(hub.sub)
            hub.release()
        for key in [k for k, h in self.hubs.items() if h.sub.finished]:
            self.hubs.pop(key).release()  # their subscriptions are gone
        hub = self.hubs[resource_id] = Hub(
            sub, self.settings, lambda block: self._tell(resource_id, block), self.budget
        )
        return hub

    def eligible(self, exchange: Exchange) -> bool:
        """Whether the request may be fanned out at all (not cross-origin)."""
        return not self.closing and "Origin" not in exchange.headers

    def authorised(self, exchange: Exchange, target: str, resource_id: str) -> bool:
        """Whether the upstream answered these credentials a 2xx for it before."""
        conv = self.registry.get(resource_id)
        client_credentials = self.profile.credentials.of(exchange.headers, target)
        return conv is not None and client_credentials.fingerprint in conv.authorised

    async def serve(self, exchange: Exchange, target: str, resource_id: str) -> bool:
        """Serve the client from the subscription; False: it must be proxied."""
        if not self.eligible(exchange):
            return False
        conv = self.registry.get(resource_id)
        if conv is None:
            return False
        client_credentials = self.profile.credentials.of(exchange.headers, target)
        if client_credentials.fingerprint not in conv.authorised:
            return False
        # A read, as a proxied stream's would be: the stream is the most
        # recently used (and opened again if it was closed).
        self.registry.observe(resource_id, client_credentials)
        hub = self._hub(resource_id)
        if hub is None or not await hub.sub.wait_live(self.settings.live_wait):
            return False
        if hub.sub.finished or hub.sub.first_event is None:
            return False
        client = Client(exchange, self.settings.client_bytes)
        headers: CIMultiDict[str] = CIMultiDict(
            {
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "Via": append_via((), exchange.version, self.via),
            }
        )
        exchange.kind = "fanout"
        self.served += 1
        await exchange.start(200, None, headers)
        hub.join(client, exchange.headers.get("Last-Event-ID"))
        try:
            await client.run()
            if client.ended and not client.dropped:
                with contextlib.suppress(ConnectionResetError):
                    await exchange.finish()
        except ConnectionResetError:
            pass  # the client left (or was dropped)
        finally:
            hub.leave(client)
        return True
