"""Attacks an outsider would try, on real sockets: what the sidecar does.

Timeouts and limits like nginx's, hostile headers in linear time, malformed
upstream answers, and hop-by-hop credentials. (Who may read state is in
``test_admin.py``; what an unauthorised client can make the sidecar do is in
``test_enrich.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.demo.fake import FakeGptme, Outcome

from ..conftest import eventually
from ..support import SIDECAR, free_port


async def raw(port: int, data: bytes, read_for: float = 3.0) -> bytes:
    """Send raw bytes; what came back before the server closed (or ``read_for`` passed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    got = b""
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                got += chunk
    except TimeoutError:
        pass
    writer.close()
    return got


async def slow_head(port: int, head: bytes, every: float, at_most: float) -> tuple[bytes, float]:
    """Send a head one byte at a time; the answer, and when it came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def dribble() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(every)

    sender = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout(at_most):
            answer = await reader.read(65536)
    finally:
        sender.cancel()
        writer.close()
    return answer, loop.time() - started


def sidecar_port(sc: Any) -> int:
    return int(sc.url.rsplit(":", 1)[1])


async def test_a_head_sent_a_byte_at_a_time_gets_408(gptme) -> None:
    g = await gptme(sidecar_options={"header_timeout": 0.5})
    port = sidecar_port(g.sidecar)
    head = b"GET /api/v2 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    answer, took = await slow_head(port, head, every=0.05, at_most=5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"source":"sidecar"' in answer
    assert took < 3
    # The same through aiohttp's path (a POST is handed over at once).
    head = b"POST /api/v2 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    answer, took = await slow_head(port, head, every=0.05, at_most=5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert took < 3


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(gptme) -> None:
    g = await gptme(sidecar_options={"header_timeout": 0.4})
    started = time.monotonic()
    answer = await raw(sidecar_port(g.sidecar), b"", read_for=5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 3


async def test_a_request_body_that_stops_gets_408_and_frees_the_upstream(
    serve, start_sidecar
) -> None:
    received: list[int] = []

    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        received.append(len(body))
        return web.json_response({"size": len(body)})

    app = web.Application()
    app.router.add_post("/upload", upload)
    upstream = await serve(app)
    sc = await start_sidecar(str(upstream.make_url("")).rstrip("/"), body_timeout=0.4)
    started = time.monotonic()
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer = await raw(sidecar_port(sc), head + b"0123456789", read_for=5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"stalled" in answer
    assert time.monotonic() - started < 3
    assert received == []  # the upstream never got a short body as if whole


async def test_connections_beyond_the_limit_are_refused(gptme) -> None:
    g = await gptme(sidecar_options={"max_connections": 3})
    port = sidecar_port(g.sidecar)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    await asyncio.sleep(0.05)
    answer = await raw(port, b"GET /api/v2 HTTP/1.1\r\nHost: x\r\n\r\n", read_for=2)
    assert answer.startswith(b"HTTP/1.1 503 ")
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.05)
    answer = await raw(port, b"GET /api/v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_websocket_message_over_the_limit_closes_it(serve, start_sidecar, http) -> None:
    sizes: list[int] = []

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            sizes.append(len(msg.data))
            await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    upstream = await serve(app)
    sc = await start_sidecar(str(upstream.make_url("")).rstrip("/"), max_ws_message=1024 * 1024)
    async with http.ws_connect(sc.url + "/ws", max_msg_size=0) as ws:
        await ws.send_bytes(b"x" * 1000)
        assert (await ws.receive()).data == b"x" * 1000
        with contextlib.suppress(ConnectionError):
            await ws.send_bytes(b"y" * (5 * 1024 * 1024))
        msg = await ws.receive()
        # Closed: with 1009 when the close frame gets through; the client is
        # still sending, so the kernel may reset the connection first (1006).
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG, 1006)
    assert sizes == [1000]  # the oversized message never reached the upstream


async def upstream_answering(answer: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_malformed_upstream_answers_are_a_clear_502(start_sidecar, http) -> None:
    cases = {
        "huge header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        "many fields": b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",
        "unasked 101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    }
    for name, answer in cases.items():
        server, port = await upstream_answering(answer)
        try:
            sc = await start_sidecar(f"http://127.0.0.1:{port}")
            async with http.get(sc.url + "/anything") as resp:
                assert resp.status == 502, name
                assert (await resp.json())["source"] == "sidecar"
        finally:
            server.close()


async def test_a_bad_reason_phrase_and_a_204_length_are_cleaned(start_sidecar) -> None:
    for answer, want in (
        (b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\n"),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 204 No Content"),
    ):
        server, port = await upstream_answering(answer)
        try:
            sc = await start_sidecar(f"http://127.0.0.1:{port}")
            got = await raw(
                sidecar_port(sc), b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert got.startswith(want), got[:80]
            if b"204" in want:
                assert b"content-length" not in got.lower().split(b"\r\n\r\n")[0]
        finally:
            server.close()


async def test_a_request_without_host_is_refused(gptme) -> None:
    g = await gptme()
    head = b"GET /api/v2/conversations/nohost HTTP/1.1\r\nX-Forwarded-Host: evil\r\n\r\n"
    answer = await raw(sidecar_port(g.sidecar), head)
    assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")  # RFC 9112 section 3.2
    assert [p for _, p in g.fake.requests if "nohost" in p] == []


async def test_the_sidecar_s_own_error_to_a_head_request_has_no_body(start_sidecar) -> None:
    sc = await start_sidecar("http://127.0.0.1:9")  # nothing listens: a 502 of ours
    answer = await raw(
        sidecar_port(sc), b"HEAD /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"Content-Length: " in head
    assert body == b""


async def test_credentials_named_in_connection_are_not_used_for_the_stream(gptme, http) -> None:
    g = await gptme("0.31.0")
    await g.create("c1")
    headers = {"Authorization": "Bearer secret", "Connection": "Authorization"}
    async with http.get(g.url("/api/v2/conversations/c1"), headers=headers) as resp:
        assert resp.status == 200
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    sub = g.sidecar.registry.get("c1").subscription
    assert "Authorization" not in sub._credentials


async def test_hostile_header_values_cost_linear_time(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome())
    await g.create("c1")
    url, _ = await g.live_etag("c1")

    async def timed(headers: dict[str, str]) -> float:
        started = time.perf_counter()
        async with http.get(url, headers=headers) as resp:
            await resp.read()
            assert resp.status in (200, 304, 400, 431), resp.status
        return time.perf_counter() - started

    baseline = min([await timed({}) for _ in range(5)])
    size = 16_000  # under aiohttp's 16 KiB field limit: it reaches the sidecar's parsing
    hostile = {
        "If-None-Match": "a" + " " * size + "x",
        "Prefer": "wait=" + "," * size,
        "Connection": "x," * (size // 2),
        "X-Forwarded-For": "1.1.1.1," * (size // 8),
    }
    for name, value in hostile.items():
        took = await timed(
            {name: value, "Prefer": "wait=0.01"} if name != "Prefer" else {name: value}
        )
        # A backtracking parse took about 5 s on the first; another request
        # takes milliseconds here.
        assert took < max(20 * baseline, 0.5), (name, took, baseline)
    # 64 KiB: refused by the HTTP parser at once, never parsed further.
    took = await timed({"If-None-Match": "a" + " " * 65536 + "x"})
    assert took < max(20 * baseline, 0.5)


async def abandon(port: int, path: str) -> None:
    """Ask for a large answer, take its first bytes, and leave."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.read(1024)
    writer.transport.abort()


async def test_abandoned_large_answers_leave_nothing_behind(gptme) -> None:
    g = await gptme("0.31.0")
    await g.create("big")
    g.fake.conversations["big"].log = [{"role": "user", "content": "x" * (1024 * 1024)}]
    port = sidecar_port(g.sidecar)
    path = "/api/v2/conversations/big"
    await abandon(port, path)  # warm up: the conversation is observed
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(10):  # 200 clients, 20 at a time
            await asyncio.gather(*(abandon(port, path) for _ in range(20)))
        await asyncio.sleep(0.3)  # their requests end
        gc.collect()
        left = [
            type(o).__name__
            for o in gc.garbage
            if type(o).__name__ in ("_Connection", "_Exchange", "Task")
            or (isinstance(o, bytes | bytearray) and len(o) >= 1024 * 1024)
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # Freed by reference counting as each request ended: nothing waited for
    # the cyclic collector (which gc.freeze() and an idle loop rarely run).
    assert left == []


async def test_merges_beyond_the_memory_cap_get_a_clear_503(gptme, http) -> None:
    size = 8 * 1024 * 1024
    g = await gptme("0.31.0", sidecar_options={"max_merge_memory": 2 * size + size // 2})
    await g.create("big")
    g.fake.conversations["big"].log = [{"role": "user", "content": "x" * size}]
    port = sidecar_port(g.sidecar)
    await g.get("big")
    # Two clients that do not read: each answer is held (written with
    # back-pressure) until its client takes it.
    slow = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /api/v2/conversations/big HTTP/1.1\r\nHost: x\r\n\r\n")
        slow.append(sock)
    await asyncio.sleep(0.5)
    async with http.get(g.url("/api/v2/conversations/big")) as resp:
        assert resp.status == 503
        assert "max_merge_memory" in (await resp.json())["error"]
    for sock in slow:
        sock.close()
    await asyncio.sleep(0.3)
    assert (await g.get("big"))["log"][0]["content"].startswith("x")  # served again


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_a_real_process_s_memory_returns_after_abandoned_answers(serve, http) -> None:
    # The process as deployed (gc.freeze() after start-up, no collection
    # forced): 200 clients abandon 1 MiB answers; its resident memory comes
    # back within 10% of what it was, and again after the next 200.
    fake = FakeGptme("0.31.0")
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *SIDECAR, "--upstream", upstream, "--port", str(port), "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base_url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(base_url + "/_sidecar/healthz"):
                    break
            await asyncio.sleep(0.1)
        async with http.put(base_url + "/api/v2/conversations/big", json={"prompt": "p"}):
            pass
        fake.conversations["big"].log = [{"role": "user", "content": "x" * (1024 * 1024)}]
        path = "/api/v2/conversations/big"
        for _ in range(5):
            await abandon(port, path)  # warm up
        await asyncio.sleep(0.5)
        baseline = rss_mib(proc.pid)
        for _ in range(2):
            for _ in range(10):  # 200 clients, 20 at a time
                await asyncio.gather(*(abandon(port, path) for _ in range(20)))
            # Freed as each request ended; given back to the system within the
            # heap trimmer's period (2 s), with no garbage collection forced.
            await eventually(lambda: rss_mib(proc.pid) <= baseline * 1.1, timeout=8)
    finally:
        proc.terminate()
        await proc.wait()


async def test_upstream_heads_are_bounded_on_aiohttp_s_client_too(start_sidecar, http) -> None:
    # A POST goes through aiohttp's client, which has the same bounds
    # (8190-byte lines, 128 fields): its refusal is a clear 502 as well.
    for answer in (
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    ):
        server, port = await upstream_answering(answer)
        try:
            sc = await start_sidecar(f"http://127.0.0.1:{port}")
            async with http.post(sc.url + "/anything", data=b"x") as resp:
                assert resp.status == 502
                assert (await resp.json())["source"] == "sidecar"
        finally:
            server.close()
