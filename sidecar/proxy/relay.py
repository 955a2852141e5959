"""An upstream answer copied to the client, as it came: every kind of request ends here.

Bytes are never altered: the body streams chunk by chunk with back-pressure
(a small answer the lean client has whole goes out in one write), and the
headers are the upstream's less hop-by-hop ones, plus ``Via``. If the
upstream breaks off mid-body, the client's connection is cut rather than the
body pretended complete; an event stream being relayed when the sidecar
shuts down is ended cleanly instead, so the client's EventSource reconnects
(to another replica, if there is one).
"""

from __future__ import annotations

import contextlib
import logging

import aiohttp

from ..http.client import UpstreamResponse
from ..http.exchange import Exchange
from ..http.headers import relayable_reason, response_headers
from ..http.upstream import complete_body

__all__ = ["LARGE_ANSWER", "Relay"]

log = logging.getLogger("sidecar.proxy")

LARGE_ANSWER = 128 * 1024  # glibc's default mmap threshold


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
        self, exchange: Exchange, upstream: UpstreamResponse, first: bytes = b""
    ) -> None:
        """Stream the upstream's response to the client (``first``: bytes of
        its body already read)."""
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
