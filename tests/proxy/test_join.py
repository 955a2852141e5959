"""A client's own event stream, opened late, is told the conversation's state first.

These are the streams the sidecar proxies (fan-out off here; a fanned-out
stream's first event is told the same way, see ``test_fanout``).

gptme 0.35.1's ``connected`` describes the client's new session; through
the sidecar its ``generating``, ``pending_tools`` and ``last_error`` are the
conversation's. The first event is awaited only within its bounds; any
other first event, and every other byte, passes as it came.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.demo.fake import INVALID_KEY_ERROR, FakeOpencode, Outcome

from ..conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def start_sidecar(start_sidecar):
    """The sidecar with fan-out off: each client's stream is proxied."""

    async def start(upstream: str, **overrides: Any) -> Any:
        return await start_sidecar(upstream, **{"fan_out": False, **overrides})

    return start


EVENTS = "/api/v2/conversations/{}/events"


async def first_events(resp: aiohttp.ClientResponse, n: int = 1) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        block = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert block.startswith(b"data: "), block
        out.append(json.loads(block[len(b"data: ") :]))
    return out


async def test_a_stream_opened_mid_step_is_told_it_generates(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome(tokens=200, pace=0.02))
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "generating")
    async with http.get(g.url(EVENTS.format("c1"), direct=True)) as direct:
        (own,) = await first_events(direct)
    async with http.get(g.url(EVENTS.format("c1"))) as resp:
        assert resp.status == 200
        connected, ping = await first_events(resp, 2)
    # Direct, the new tab's own session: not generating.
    assert own["type"] == "connected" and own["generating"] is False
    assert connected["type"] == "connected" and connected["generating"] is True
    # Its own session id is the upstream's, kept: a tab steps with it.
    assert connected["session_id"] in g.fake.sessions and connected["session_id"] != sid
    assert connected["session_id"] != own["session_id"]
    assert ping == {"type": "ping"}


async def test_a_stream_opened_while_a_tool_waits_is_told_the_tool(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome(kind="tool", tokens=2))
    sid = await g.create("c1")
    await g.step("c1", sid)
    session = await g.wait_status("c1", "awaiting_tool")
    async with http.get(g.url(EVENTS.format("c1"))) as resp:
        (connected,) = await first_events(resp)
    assert connected["generating"] is False
    assert connected["pending_tools"] == session["pending_tools"]
    (tool,) = connected["pending_tools"]
    assert set(tool) == {"tool_id", "tooluse", "auto_confirm"}  # gptme's own shape


async def test_a_stream_opened_after_a_failure_is_told_the_error(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome(kind="error"))
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")
    async with http.get(g.url(EVENTS.format("c1"))) as resp:
        (connected,) = await first_events(resp)
    assert connected["last_error"] == INVALID_KEY_ERROR and connected["generating"] is False


async def test_an_unknown_state_and_0_31_0s_connected_pass_as_they_came(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome(tokens=200, pace=0.02))
    sid = await g.create("c1", direct=True)
    await g.step("c1", sid, direct=True)  # the sidecar knows nothing of this step
    async with http.get(g.url(EVENTS.format("c1"))) as resp:
        (connected,) = await first_events(resp)
    assert connected["generating"] is False  # the upstream's own word, as it came
    old = await gptme("0.31.0", outcome=Outcome(tokens=200, pace=0.02))
    sid = await old.create("c2")
    await old.step("c2", sid)
    await old.wait_status("c2", "generating")
    async with http.get(old.url(EVENTS.format("c2"))) as resp:
        block = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert json.loads(block[len(b"data: ") :]).keys() == {"type", "session_id"}


class Origin:
    """A gptme-like upstream whose client streams begin as a test says.

    The sidecar's own stream (no query) says the conversation generates;
    a client's (``?case=...``) sends the case's bytes, then ``data: end``."""

    CASES: dict[str, list[tuple[float, bytes]]] = {
        "split": [
            (0.0, b'data: {"type":"connected",'),
            (0.05, b'"session_id":"s9","generating":false}\r'),
            (0.05, b"\n\r\ndata: {}\n\n"),
        ],
        "other": [
            (0.0, b'data: {"type":"ping"}\n\ndata: {"type":"connected","generating":false}\n\n')
        ],
        "slow": [(0.6, b'data: {"type":"connected","generating":false}\n\n')],
        "silent-part": [(0.0, b'data: {"type":"connected",'), (0.6, b'"generating":false}\n\n')],
        "huge": [
            (0.0, b'data: {"type":"connected","generating":false,"x":"' + b"x" * 70_000),
            (0.0, b'"}\n\n'),
        ],
        "comment": [(0.0, b": hello\n\n")],
    }

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_get("/api/v2/conversations/{id}", self.get)
        self.app.router.add_get("/api/v2/conversations/{id}/events", self.events)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response({"log": []})

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        case = request.query.get("case")
        if case is None:
            await resp.write(b'data: {"type":"generation_started"}\n\n')
        elif case in ("ends", "cut"):  # half a first event, then the end of the body
            await resp.write(b'data: {"type":"connected",')
            if case == "cut":
                assert request.transport is not None
                request.transport.close()
            return resp
        else:
            for delay, chunk in self.CASES[case]:
                await asyncio.sleep(delay)
                await resp.write(chunk)
            await resp.write(b"data: end\n\n")
        await asyncio.sleep(30)
        return resp


@pytest.fixture(params=[True, False], ids=["front-door", "aiohttp-server"])
async def origin(request, serve, start_sidecar, tmp_path, http):
    # The gptme profile with a short bound on the first event.
    text = (ROOT / "config" / "gptme.toml").read_text(encoding="utf-8")
    text = text.replace('event = "connected"\n', 'event = "connected"\nmax_seconds = 0.3\n', 1)
    assert "max_seconds = 0.3" in text
    profile = tmp_path / "gptme-short.toml"
    profile.write_text(text, encoding="utf-8")
    o = Origin()
    server = await serve(o.app)
    upstream = str(server.make_url("")).rstrip("/")
    sc = await start_sidecar(upstream, profile=str(profile), front_door=request.param)
    async with http.get(sc.url + "/api/v2/conversations/c1") as resp:
        assert resp.status == 200
    await eventually(lambda: sc.snapshot("c1").status == "generating")
    return sc


async def read_to_end(http: aiohttp.ClientSession, url: str) -> tuple[bytes, float]:
    start = asyncio.get_running_loop().time()
    got = b""
    async with http.get(url) as resp:
        assert resp.status == 200
        while not got.endswith(b"data: end\n\n"):
            got += await asyncio.wait_for(resp.content.readany(), 5)
    return got, asyncio.get_running_loop().time() - start


async def test_a_first_event_split_anyhow_is_told(origin, http) -> None:
    got, _ = await read_to_end(http, origin.url + EVENTS.format("c1") + "?case=split")
    assert got == (
        b'data: {"type":"connected","session_id":"s9","generating":true}\n\n'
        b"data: {}\n\ndata: end\n\n"
    )


@pytest.mark.parametrize("case", ["other", "huge", "comment"])
async def test_any_other_first_event_passes_byte_for_byte(origin, http, case: str) -> None:
    got, _ = await read_to_end(http, origin.url + EVENTS.format("c1") + f"?case={case}")
    assert got == b"".join(c for _, c in Origin.CASES[case]) + b"data: end\n\n"


@pytest.mark.parametrize("case", ["slow", "silent-part"])
async def test_a_first_event_late_past_the_bound_passes_as_it_came(origin, http, case) -> None:
    got, took = await read_to_end(http, origin.url + EVENTS.format("c1") + f"?case={case}")
    assert got == b"".join(c for _, c in Origin.CASES[case]) + b"data: end\n\n"
    assert took < 3


async def test_the_bound_does_not_hold_back_what_came(origin, http) -> None:
    """A part of the first event is written when the bound passes, before the rest."""
    url = origin.url + EVENTS.format("c1") + "?case=silent-part"
    async with http.get(url) as resp:
        start = asyncio.get_running_loop().time()
        part = await asyncio.wait_for(resp.content.readany(), 5)
        took = asyncio.get_running_loop().time() - start
    assert part == b'data: {"type":"connected",'
    assert 0.2 < took < 0.55  # the bound (0.3 s), not the upstream's 0.6 s


async def test_a_stream_that_ends_inside_its_first_event_ends_so(origin, http) -> None:
    url = origin.url + EVENTS.format("c1") + "?case=ends"
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        assert await resp.read() == b'data: {"type":"connected",'


async def test_a_stream_cut_inside_its_first_event_is_cut_for_the_client(origin, http) -> None:
    url = origin.url + EVENTS.format("c1") + "?case=cut"
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()  # not presented as complete


async def test_opencode_streams_are_followed_by_the_busy_sessions(
    serve, start_sidecar, http
) -> None:
    fake = FakeOpencode(outcome=Outcome(tokens=200, pace=0.02))
    server = await serve(fake.app)
    sc = await start_sidecar(str(server.make_url("")).rstrip("/"), profile="opencode")
    async with http.post(sc.url + "/session", json={}) as resp:
        busy = (await resp.json())["id"]
    async with http.post(sc.url + "/session", json={}) as resp:
        idle = (await resp.json())["id"]
    body = {"parts": [{"type": "text", "text": "hi"}]}
    async with http.post(sc.url + f"/session/{busy}/prompt_async", json=body) as resp:
        assert resp.status == 204
    await eventually(lambda: sc.snapshot(busy).status == "generating")
    assert sc.snapshot(idle) is not None
    async with http.get(sc.url + "/event") as resp:
        connected, status = await first_events(resp, 2)
    assert connected == {"type": "server.connected", "properties": {}}
    assert status.pop("id").startswith("evt_")
    assert status == {
        "type": "session.status",
        "properties": {"sessionID": busy, "status": {"type": "busy"}},
    }
