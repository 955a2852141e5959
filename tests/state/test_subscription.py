"""The sidecar's own subscription: reconnects, ids, retry, backoff."""

from __future__ import annotations

import asyncio

from aiohttp import web

from sidecar.state.subscription import Backoff

from ..conftest import eventually


class IdUpstream:
    """An upstream whose stream gives ids and a retry time, then drops."""

    def __init__(self) -> None:
        self.last_event_ids: list[str | None] = []
        self.connected_at: list[float] = []
        self.app = web.Application()
        self.app.router.add_get("/api/v2/conversations/{id}", self.conversation)
        self.app.router.add_get("/api/v2/conversations/{id}/events", self.events)

    async def conversation(self, request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "log": []})

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.last_event_ids.append(request.headers.get("Last-Event-ID"))
        self.connected_at.append(asyncio.get_running_loop().time())
        n = len(self.last_event_ids)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(
            f'retry: 300\nid: ev-{n}\ndata: {{"type": "generation_started"}}\n\n'.encode()
        )
        if n == 1:
            await resp.write(b'data: {"type": "err')  # cut mid-event
            return resp
        await asyncio.sleep(30)
        return resp


async def test_reconnect_sends_last_event_id_and_honours_retry(serve, start_sidecar, http) -> None:
    up = IdUpstream()
    server = await serve(up.app)
    sc = await start_sidecar(str(server.make_url("")).rstrip("/"))
    async with http.get(sc.url + "/api/v2/conversations/c1") as resp:
        assert resp.status == 200
    await eventually(lambda: len(up.last_event_ids) >= 2)
    assert up.last_event_ids[:2] == [None, "ev-1"]
    # retry: 300 raised the floor over the configured 0.05 s minimum.
    assert up.connected_at[1] - up.connected_at[0] >= 0.29
    # The half-received event of the first connection was discarded.
    assert sc.snapshot("c1").status == "generating"
    assert sc.registry.malformed_events == 0


def test_backoff_is_capped_jittered_and_resets() -> None:
    backoff = Backoff(base=0.5, cap=4.0)
    delays = [backoff.next_delay() for _ in range(10)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 4.0 for d in delays)
    assert max(delays[5:]) > 2.0  # it grew to the cap
    assert len({round(d, 6) for d in delays}) > 5  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.5
    assert backoff.next_delay(floor=3.0) >= 3.0


async def test_a_stream_whose_headers_never_come_is_tried_again_soon(
    serve, start_sidecar, http
) -> None:
    # opencode, for its first moments, accepts connections and never answers
    # them. The first stream request lands there; the sidecar must not wait
    # for it as long as a silent stream (stale_after, here 30 s).
    answered = IdUpstream()
    server = await serve(answered.app)
    target = server.port
    held: list[asyncio.StreamWriter] = []

    async def mute_then_forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if not held:
            held.append(writer)  # accepted, never answered
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    front = await asyncio.start_server(mute_then_forward, "127.0.0.1", 0)
    port = front.sockets[0].getsockname()[1]
    try:
        sc = await start_sidecar(
            f"http://127.0.0.1:{port}", stale_after=30.0, stream_head_timeout=0.3
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with http.get(sc.url + "/api/v2/conversations/c1") as resp:
            assert resp.status == 200
        await eventually(lambda: sc.snapshot("c1").stream == "live", timeout=5)
        assert loop.time() - started < 3  # the head timeout, then a retry that answered
        assert len(held) == 1 and answered.last_event_ids
    finally:
        for writer in held:
            writer.close()
        front.close()
        await front.wait_closed()
