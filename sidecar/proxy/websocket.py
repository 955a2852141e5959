"""WebSocket upgrades, proxied both ways, message by message.

The upgrade goes upstream with the client's headers (less the handshake's
own, which aiohttp's client makes anew) and the subprotocols it offered;
then two pumps copy messages each way. A message over ``max_ws_message``
closes the connection (1009) and is never relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from ..http.errors import UpstreamError
from ..http.exchange import WebExchange
from ..http.upstream import Upstream

__all__ = ["WebSockets"]

_WEBSOCKET_DROP = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)


class WebSockets:
    def __init__(self, upstream: Upstream, max_message: int) -> None:
        self.upstream = upstream
        self.max_message = max_message

    async def relay(self, exchange: WebExchange, target: str) -> None:
        request = exchange.request
        headers = self.upstream.headers(exchange)
        for name in _WEBSOCKET_DROP:
            headers.popall(name, None)
        protocols = [
            p.strip()
            for v in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in v.split(",")
            if p.strip()
        ]
        url = self.upstream.target_url(target)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        try:
            async with asyncio.timeout(self.upstream.response_timeout):
                upstream_ws = await self.upstream.session.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    autoping=False,
                    max_msg_size=self.max_message,
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
            max_msg_size=self.max_message,
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
