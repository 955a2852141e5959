"""The sidecar as a plain reverse proxy: bytes, headers and errors pass as they should."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import socket

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

MiB = 1024 * 1024
PAYLOAD = os.urandom(50 * MiB)


class Origin:
    """An upstream that reports exactly what it received."""

    def __init__(self) -> None:
        self.seen: list[web.Request] = []
        self.seen_headers: list[list[tuple[str, str]]] = []
        self.release_second_event = asyncio.Event()
        self.app = web.Application(client_max_size=1024**3)
        r = self.app.router
        r.add_route("*", "/echo", self.echo)
        r.add_post("/upload", self.upload)
        r.add_get("/download", self.download)
        r.add_get("/cookies", self.cookies)
        r.add_get("/redirect", self.redirect)
        r.add_get("/gzip", self.gzipped)
        r.add_get("/sse", self.sse)
        r.add_get("/slow", self.slow)
        r.add_get("/cut", self.cut)
        r.add_get("/ws", self.ws)

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen_headers.append([(k.decode(), v.decode()) for k, v in request.raw_headers])
        return web.json_response(
            {"method": request.method, "path": request.raw_path, "body": body.decode()}
        )

    async def upload(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    async def download(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(PAYLOAD)
        await resp.prepare(request)
        view = memoryview(PAYLOAD)
        for i in range(0, len(PAYLOAD), MiB):
            await resp.write(view[i : i + MiB])
        return resp

    async def cookies(self, request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        resp.headers["X-Private-Hop"] = "secret"
        resp.headers["Connection"] = "X-Private-Hop"
        resp.headers["Keep-Alive"] = "timeout=5"
        return resp

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("http://elsewhere.invalid/target")

    async def gzipped(self, request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b"x" * 1000, mtime=0),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await self.release_second_event.wait()  # only once the client saw "one"
        await resp.write(b"data: two\n\n")
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def cut(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws


@pytest.fixture
async def origin(serve, start_sidecar):
    o = Origin()
    server = await serve(o.app)
    o.url = str(server.make_url("")).rstrip("/")
    o.sidecar = await start_sidecar(o.url, response_timeout=1.0)
    return o


async def test_a_50_mib_upload_arrives_byte_identical(origin, http) -> None:
    async with http.post(origin.sidecar.url + "/upload", data=PAYLOAD) as resp:
        assert await resp.json() == {
            "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
            "size": len(PAYLOAD),
        }


async def test_a_chunked_upload_larger_than_aiohttps_limit_streams_through(origin, http) -> None:
    async def body():
        view = memoryview(PAYLOAD)
        for i in range(0, 8 * MiB, 256 * 1024):
            yield bytes(view[i : i + 256 * 1024])

    async with http.post(origin.sidecar.url + "/upload", data=body()) as resp:
        assert (await resp.json())["sha256"] == hashlib.sha256(PAYLOAD[: 8 * MiB]).hexdigest()


async def test_a_50_mib_download_arrives_byte_identical(origin, http) -> None:
    async with http.get(origin.sidecar.url + "/download") as resp:
        assert resp.headers["Content-Length"] == str(len(PAYLOAD))
        digest = hashlib.sha256()
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(PAYLOAD).hexdigest()


async def test_sse_reaches_the_client_event_by_event(origin, http) -> None:
    async with http.get(origin.sidecar.url + "/sse") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2)
        assert first == b"data: one\n\n"
        origin.release_second_event.set()
        assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2) == b"data: two\n\n"


async def test_request_method_path_query_and_body_pass_exactly(origin, http) -> None:
    path = "/echo?q=a%2Fb&x=%20&x=2"
    url = URL(origin.sidecar.url + path, encoded=True)  # the client must not requote it
    async with http.request("PATCH", url, data=b'{"k": "v"}') as resp:
        assert await resp.json() == {"method": "PATCH", "path": path, "body": '{"k": "v"}'}


async def test_request_headers_forwarded_without_invented_ones(origin) -> None:
    # A raw client, so we control every header sent.
    host, port = origin.sidecar.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /echo HTTP/1.1\r\nHost: public.example\r\nX-Custom: 1\r\nX-Custom: 2\r\n"
        b"Connection: keep-alive, X-Drop-Me\r\nX-Drop-Me: yes\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic x\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    (headers,) = origin.seen_headers
    names = [k.lower() for k, _ in headers]
    upstream_authority = origin.url.removeprefix("http://")
    assert ("Host", upstream_authority) in headers
    assert [v for k, v in headers if k == "X-Custom"] == ["1", "2"]
    for gone in ("x-drop-me", "keep-alive", "te", "proxy-authorization", "connection"):
        assert gone not in names
    for invented in ("user-agent", "accept", "accept-encoding", "content-type"):
        assert invented not in names
    assert dict(headers)["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert dict(headers)["X-Forwarded-Proto"] == "http"
    assert dict(headers)["X-Forwarded-Host"] == "public.example"
    assert dict(headers)["Via"] == "1.1 sidecar"


async def test_response_headers_keep_repeats_and_drop_hop_by_hop(origin, http) -> None:
    async with http.get(origin.sidecar.url + "/cookies") as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert "X-Private-Hop" not in resp.headers
        assert "Keep-Alive" not in resp.headers
        assert resp.headers["Via"] == "1.1 sidecar"


async def test_redirects_are_relayed_not_followed(origin, http) -> None:
    async with http.get(origin.sidecar.url + "/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "http://elsewhere.invalid/target"


async def test_compressed_bodies_pass_untouched(origin) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(origin.sidecar.url + "/gzip") as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert await resp.read() == gzip.compress(b"x" * 1000, mtime=0)


async def test_unreachable_upstream_is_a_502_naming_it(start_sidecar, http) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    sc = await start_sidecar(f"http://127.0.0.1:{port}")
    async with http.get(sc.url + "/anything") as resp:
        assert resp.status == 502
        body = await resp.json()
        assert body["upstream"] == f"http://127.0.0.1:{port}"
        assert "unreachable" in body["error"]


async def test_no_response_headers_in_time_is_a_504(origin, http) -> None:
    async with http.get(origin.sidecar.url + "/slow") as resp:
        assert resp.status == 504
        assert "no response headers" in (await resp.json())["error"]


async def test_a_body_cut_off_upstream_is_not_presented_as_complete(origin, http) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(origin.sidecar.url + "/cut") as resp:
            await resp.read()


async def test_websockets_are_proxied_both_ways(origin, http) -> None:
    async with http.ws_connect(origin.sidecar.url + "/ws", protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
        await ws.send_bytes(b"abc")
        assert (await ws.receive()).data == b"cba"


async def test_an_absolute_form_target_never_leaves_the_configured_upstream(origin) -> None:
    host, port = origin.sidecar.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET http://elsewhere.invalid/echo?x=1 HTTP/1.1\r\nHost: elsewhere.invalid\r\n\r\n"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    (headers,) = origin.seen_headers  # the configured upstream got it, with its own Host
    assert dict(headers)["Host"] == origin.url.removeprefix("http://")
