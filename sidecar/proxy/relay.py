"""An upstream answer copied to the client, as it came: every kind of request ends here.

Bytes are never altered: the body streams chunk by chunk with back-pressure
(a small answer the lean client has whole goes out in one write), and the
headers are the upstream's less hop-by-hop ones, plus ``Via``. If the
upstream breaks off mid-body, the client's connection is cut rather than the
body pretended complete; an event stream being relayed when the sidecar
shuts down is ended cleanly instead, so the client's EventSource reconnects
(to another replica, if there is one).

One exception, asked for by the profile (``[stream.join]``,
``sidecar.core.join``): a client's own event stream may have its *first
event* told as the sidecar knows the state (:class:`FirstEvent`). It is
awaited at most ``max_bytes`` and ``max_seconds``; if it does not come in
that bound, or is not the event to tell, what arrived passes as it came.
Every other byte is the upstream's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

from ..core.join import first_event_end
from ..http.client import UpstreamResponse
from ..http.exchange import Exchange
from ..http.headers import relayable_reason, response_headers
from ..http.upstream import complete_body

__all__ = ["LARGE_ANSWER", "FirstEvent", "Relay"]

log = logging.getLogger("sidecar.proxy")

LARGE_ANSWER = 128 * 1024  # glibc's default mmap threshold


@dataclass(frozen=True, slots=True)
class FirstEvent:
    """How an event stream's first event is told (``sidecar.core.join``)."""

    #: The first event's bytes -> what the client gets instead (None: as it came).
    tell: Callable[[bytes], bytes | None]
    max_bytes: int
    max_seconds: float


class Relay:
    """Copies answers to clients; knows the event streams it relays."""

    def __init__(self, via: str) -> None:
        self.via = via
        self.closing = False
        #: Upstream responses being relayed as SSE: ended on shutdown.
        self._streams: set[UpstreamResponse] = set()
        #: Answers of LARGE_ANSWER bytes or more finished (see server.HeapTrimmer).
        self.large_answers = 0

    def begin_shutdown(self) -> None:
        """End the event streams being relayed, cleanly."""
        self.closing = True
        for upstream in list(self._streams):
            upstream.close()

    async def relay(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        first: bytes = b"",
        first_event: FirstEvent | None = None,
    ) -> None:
        """Stream the upstream's response to the client (``first``: bytes of
        its body already read; ``first_event``: an event stream's first event
        is told so)."""
        headers = response_headers(upstream, exchange.version, self.via)
        if not first and "Content-Length" in headers:
            body = complete_body(upstream)
            if body is not None:  # all in already (a small answer): one write
                upstream.release()
                try:
                    await exchange.respond(
                        upstream.status, relayable_reason(upstream), headers, body
                    )
                finally:
                    if len(body) >= LARGE_ANSWER:
                        self.large_answers += 1
                return
        is_stream = upstream.content_type == "text/event-stream"
        if is_stream:
            self._streams.add(upstream)
        complete = False
        try:
            await exchange.start(upstream.status, relayable_reason(upstream), headers)
            if first:
                await exchange.write(first)
            chunks = aiter(upstream.content.iter_any())
            if is_stream and first_event is not None:
                await self._first_event(exchange, chunks, first_event)
            async for chunk in chunks:
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

    async def _first_event(
        self, exchange: Exchange, chunks: AsyncIterator[bytes], first_event: FirstEvent
    ) -> None:
        """Read the stream's first event (within its bounds) and write it as
        it is told; whatever else was read goes out as it came.

        A read the bound overtakes is not cancelled (a body's iterator may
        not survive that): its chunk is awaited and written after the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + first_event.max_seconds
        buf = b""
        end = None
        pending: asyncio.Task[bytes] | None = None
        try:
            while len(buf) < first_event.max_bytes:
                end = first_event_end(buf)
                if end is not None:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                pending = asyncio.create_task(_next(chunks))
                done, _ = await asyncio.wait((pending,), timeout=remaining)
                if not done:
                    break  # the bound: the read goes on below
                read, pending = pending, None
                try:
                    buf += read.result()  # the upstream's own failure propagates
                except StopAsyncIteration:
                    break  # the end of the stream
            else:
                end = first_event_end(buf)
                if end is not None and end > first_event.max_bytes:
                    end = None  # larger than the bound: as it came
            if end is None:
                if buf:
                    await exchange.write(buf)
            else:
                told = None
                try:
                    told = first_event.tell(buf[:end])
                except Exception:
                    # A fault of the sidecar's own: the stream goes on as it came.
                    log.exception("the first event of a stream could not be told")
                await exchange.write(buf if told is None else told + buf[end:])
            if pending is not None:
                read, pending = pending, None
                with contextlib.suppress(StopAsyncIteration):
                    await exchange.write(await read)
        finally:
            if pending is not None:
                pending.cancel()


async def _next(chunks: AsyncIterator[bytes]) -> bytes:
    return await chunks.__anext__()
