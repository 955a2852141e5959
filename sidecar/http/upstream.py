"""Asking the upstream: the one place that chooses between the two HTTP clients.

Bodyless GETs to a plain-http upstream take the lean client
(:mod:`sidecar.http.client`: a pooled keep-alive connection, the head in one
write, llhttp for the answer); everything else (bodies, other methods, https)
takes aiohttp's client. Both answer with an :class:`UpstreamResponse`, so
what reads the answer does not care which client fetched it; the few places
where the lean client can do better (a small answer that is already whole)
are the functions here.

Every failure of either client becomes an :class:`~sidecar.http.errors.UpstreamError`
with the status the client gets: ``502`` unreachable, broken, or answering
with a header no client could be sent (a control character), ``504`` no
response headers within ``response_timeout``, ``413`` a body over the limit,
``408`` a body that stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import client
from .client import UpstreamResponse
from .errors import BodyStalled, BodyTooLarge, UpstreamError, stalled, too_large
from .exchange import Exchange
from .headers import request_headers

__all__ = ["Upstream", "complete_body", "read_at_most"]

#: What RFC 9110 section 5.5 forbids in a field value: controls but HTAB
#: (obs-text, bytes 0x80 and up, is allowed).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Upstream:
    """The configured upstream, and the means to send it a client's request."""

    def __init__(
        self,
        url: URL,
        session: aiohttp.ClientSession,
        *,
        connect_timeout: float,
        response_timeout: float,
        max_request_body: int,
        body_timeout: float,
        preserve_host: bool,
        via: str,
        on_latency: Callable[[str, float], None],
    ) -> None:
        self.url = url
        self.session = session
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_request_body = max_request_body
        self.body_timeout = body_timeout
        self.preserve_host = preserve_host
        self.via = via
        self._on_latency = on_latency
        self._prefix = str(url.origin()) + url.raw_path.rstrip("/")
        self._base_path = url.raw_path.rstrip("/")
        self._header_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=response_timeout
        )
        # Bodyless GETs to a plain-http upstream take the lean client.
        self._pool = (
            client.Pool(url.host or "", url.port or 80, connect_timeout)
            if url.scheme == "http"
            else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def target_url(self, target: str) -> URL:
        """The upstream URL of a request target (path and query, as sent)."""
        return URL(self._prefix + target, encoded=True)

    def headers(self, exchange: Exchange) -> CIMultiDict[str]:
        """The headers a client's request is forwarded with."""
        return request_headers(exchange, self.url, self.preserve_host, self.via)

    def stalled(self) -> UpstreamError:
        return stalled(self.body_timeout)

    async def send(
        self,
        exchange: Exchange,
        target: str,
        data: Any = None,
        headers: CIMultiDict[str] | None = None,
    ) -> UpstreamResponse:
        """Send the request upstream; returns once response headers arrived."""
        if headers is None:
            headers = self.headers(exchange)
        limit = self.max_request_body
        if data is None:
            data = exchange.body(limit, self.body_timeout)
        started = time.perf_counter()
        response: UpstreamResponse
        try:
            if self._pool is not None and exchange.method == "GET" and data is None:
                response = await self._pool.get(
                    self._base_path + target, headers, self.response_timeout
                )
            else:
                # sock_read bounds the wait for the response headers; it is
                # lifted once they arrive, so a stream never times out.
                stalled_body: asyncio.Future[None] | None = None
                if isinstance(data, AsyncIterator):
                    stalled_body = asyncio.get_running_loop().create_future()
                    data = _watched(data, stalled_body)
                asking = self.session.request(
                    exchange.method,
                    self.target_url(target),
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    timeout=self._header_timeout,
                )
                client_response = await (
                    _unless_stalled(asking, stalled_body) if stalled_body is not None else asking
                )
                connection = client_response.connection
                if connection is not None and connection.protocol is not None:
                    connection.protocol.read_timeout = None
                    connection.protocol.start_timeout()  # cancels the pending timer
                response = client_response
        except BodyTooLarge:
            raise too_large(limit) from None
        except BodyStalled:
            raise self.stalled() from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamError(
                504,
                f"upstream sent no response headers within {self.response_timeout:g} s",
            ) from None
        except (aiohttp.ClientConnectorError, client.ConnectFailed) as exc:
            raise UpstreamError(502, f"upstream unreachable: {exc.os_error or exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            if _caused_by(exc, BodyTooLarge):  # aiohttp wraps the body's own error
                raise too_large(limit) from None
            if _caused_by(exc, BodyStalled):
                raise self.stalled() from None
            raise UpstreamError(502, f"upstream failed: {type(exc).__name__}: {exc}") from None
        self._on_latency(exchange.kind, time.perf_counter() - started)
        if _CONTROL.search("\t".join(response.headers.values())) is not None:
            # Relayed, it would break the client's parser or the sidecar's
            # own writer halfway through a head: the upstream's fault, said so.
            response.close()
            raise UpstreamError(
                502, "the upstream's answer has a header value with a control character"
            )
        return response


def complete_body(upstream: UpstreamResponse) -> bytes | None:
    """The whole body if it has all arrived and none of it was read yet
    (only the lean client can tell: aiohttp's answers None)."""
    if isinstance(upstream, client.Response):
        return upstream.complete_body()
    return None


async def read_at_most(upstream: UpstreamResponse, limit: int) -> bytes:
    """Read the body, stopping once it is known to exceed ``limit``."""
    body = complete_body(upstream)  # a small answer is often all in already
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


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
