"""Bad streams: garbage is counted and skipped, bursts are absorbed, nothing else suffers."""

from __future__ import annotations

import asyncio

from aiohttp import web

from sidecar.demo.fake import Outcome

from ..conftest import eventually

ADMIN = {"Authorization": "Bearer adm"}

MiB = 1024 * 1024


class GarbageUpstream:
    """Conversation "bad" streams garbage then a real error; "good" streams normally."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_get("/api/v2/conversations/{id}", self.conversation)
        self.app.router.add_get("/api/v2/conversations/{id}/events", self.events)
        self.go = asyncio.Event()

    async def conversation(self, request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "log": []})

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"type": "connected"}\n\n')
        await self.go.wait()
        if request.match_info["id"] == "bad":
            await resp.write(b"data: this is not json\n\n")
            await resp.write(b"data: \xff\xfe\xfd invalid utf-8\n\n")
            await resp.write(b'data: {"type": "gen\x00eration_started"}\n\n')  # raw NUL: not JSON
            await resp.write(b'data: {"type": "gen\\u0000eration_started"}\n\n')  # escaped: JSON
            await resp.write(b"data: [1, 2, 3]\n\n")
            await resp.write(b'data: {"no_type": true}\n\n')
            await resp.write(b"data: " + b"A" * (10 * MiB) + b"\n\n")  # a 10 MiB line
            await resp.write(b'data: {"type": "error", "error": "after the garbage"}\n\n')
        else:
            await resp.write(b'data: {"type": "generation_started"}\n\n')
            await resp.write(b'data: {"type": "generation_complete", "message": {}}\n\n')
        await asyncio.sleep(30)
        return resp


async def test_garbage_is_counted_and_skipped_and_others_are_unaffected(
    serve, start_sidecar, http
) -> None:
    up = GarbageUpstream()
    server = await serve(up.app)
    sc = await start_sidecar(
        str(server.make_url("")).rstrip("/"), max_event_bytes=MiB, admin_token="adm"
    )
    for cid in ("bad", "good"):
        async with http.get(f"{sc.url}/api/v2/conversations/{cid}") as resp:
            assert resp.status == 200
    await eventually(lambda: all(sc.snapshot(c).stream == "live" for c in ("bad", "good")))
    up.go.set()
    await eventually(lambda: sc.snapshot("bad").status == "failed")
    await eventually(lambda: sc.snapshot("good").status == "completed")
    assert sc.snapshot("bad").last_error == "after the garbage"
    bad = sc.registry.get("bad").subscription
    assert bad.connects == 1  # the subscription survived all of it
    assert bad.decoder.oversized == 1
    # non-JSON, invalid UTF-8, a raw NUL in a string, a list, an object with no type
    assert sc.registry.malformed_events == 5
    async with http.get(f"{sc.url}/_sidecar/metrics", headers=ADMIN) as resp:
        text = await resp.text()
    assert "sidecar_malformed_events_total 6.0" in text  # and the 10 MiB line
    assert 'sidecar_events_total{type="other"} 1.0' in text  # the escaped NUL: unknown type


async def test_a_burst_of_ten_thousand_events_is_absorbed(gptme) -> None:
    g = await gptme("0.31.0", outcome=Outcome(tokens=10_000, pace=0))
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "completed", timeout=30)
    sub = g.sidecar.registry.get("c1").subscription
    assert sub.events >= 10_000 and sub.connects == 1
    assert g.sidecar.registry.events_by_type["generation_progress"] == 10_000
