"""Fan-out: clients' event streams served from the sidecar's one subscription, with ids and replay.

gptme's profile has ``stream.fan_out``: however many clients read a
conversation's ``/events`` through the sidecar, the upstream serves one
stream (the sidecar's). Each event carries an ``id:`` of the sidecar's; a
client that comes back with ``Last-Event-ID`` gets exactly what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sidecar.app import PROXY
from sidecar.core.sse import EventDecoder, ServerSentEvent
from sidecar.demo.fake import Outcome

from ..conftest import eventually

EVENTS = "/api/v2/conversations/{}/events"


class Reader:
    """A client's event stream, read event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.decoder = EventDecoder(64 * 1024 * 1024)
        self.pending: list[ServerSentEvent] = []

    async def next(self, timeout: float = 5.0) -> ServerSentEvent:
        async with asyncio.timeout(timeout):
            while not self.pending:
                chunk = await self.resp.content.readany()
                assert chunk, "the stream ended"
                self.pending.extend(self.decoder.feed(chunk))
        return self.pending.pop(0)

    async def until(self, event_type: str, timeout: float = 5.0) -> list[ServerSentEvent]:
        out = []
        async with asyncio.timeout(timeout):
            while True:
                sse = await self.next(timeout)
                out.append(sse)
                if kind(sse) == event_type:
                    return out


def kind(sse: ServerSentEvent) -> str:
    if sse.event != "message":
        return sse.event
    return str(json.loads(sse.data).get("type"))


@contextlib.asynccontextmanager
async def stream(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Reader]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with http.get(url, headers=headers or {}, timeout=timeout) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        yield Reader(resp)


def fanout(g: Any) -> Any:
    return g.sidecar.server.app[PROXY].fanout


async def opened(g: Any, cid: str) -> None:
    """Observed and authorised through the sidecar, its stream live."""
    await g.get(cid)
    await eventually(lambda: g.sidecar.snapshot(cid).stream == "live")


async def test_ten_clients_cost_the_upstream_one_stream_and_share_its_session(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome(tokens=3))
    sid = await g.create("c1")
    await opened(g, "c1")
    assert g.fake.subscriber_count("c1") == 1  # the sidecar's own
    url = g.url(EVENTS.format("c1"))
    async with contextlib.AsyncExitStack() as stack:
        readers = [await stack.enter_async_context(stream(http, url)) for _ in range(10)]
        firsts = [await r.next() for r in readers]
        assert g.fake.subscriber_count("c1") == 1  # still one
        sessions = {json.loads(f.data)["session_id"] for f in firsts}
        assert len(sessions) == 1 and sessions != {sid}  # the sidecar's session, shared
        assert all(kind(f) == "connected" and f.id for f in firsts)
        # A step taken with the shared session id, from any client.
        (shared,) = sessions
        assert (await g.step("c1", shared)).status == 200
        seen = [await r.until("generation_complete") for r in readers]
    ids = [[e.id for e in events] for events in seen]
    assert all(i == ids[0] for i in ids)  # the same events, the same ids
    assert [e.data for e in seen[0]] == [e.data for e in seen[-1]]
    numbers = [int(i.rpartition("-")[2]) for i in ids[0]]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    await eventually(lambda: fanout(g).clients() == 0)


async def test_with_fan_out_off_each_client_costs_a_stream(gptme, http) -> None:
    g = await gptme("0.35.1", sidecar_options={"fan_out": False})
    await g.create("c1")
    await opened(g, "c1")
    assert fanout(g) is None
    url = g.url(EVENTS.format("c1"))
    async with contextlib.AsyncExitStack() as stack:
        readers = [await stack.enter_async_context(stream(http, url)) for _ in range(3)]
        firsts = [await r.next() for r in readers]
        assert not any(f.id for f in firsts)  # the upstream's bytes: no ids
        assert g.fake.subscriber_count("c1") == 4


async def test_a_client_not_authorised_for_the_conversation_is_proxied(gptme, http) -> None:
    g = await gptme("0.35.1", token="s3cret")
    g.headers = {"Authorization": "Bearer s3cret"}
    await g.create("c1")
    await opened(g, "c1")
    url = g.url(EVENTS.format("c1"))
    async with http.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401  # the upstream's own answer
    async with http.get(url) as resp:
        assert resp.status == 401
    async with stream(http, url, g.headers) as reader:
        first = await reader.next()
        assert first.id and kind(first) == "connected"
    assert fanout(g).served == 1


@pytest.mark.parametrize("front_door", [True, False], ids=["front-door", "aiohttp-server"])
async def test_a_client_that_does_not_read_is_dropped_and_slows_nobody(
    gptme, http, front_door: bool
) -> None:
    options = {"fan_out_client_bytes": 256 * 1024, "front_door": front_door}
    g = await gptme("0.35.1", sidecar_options=options)
    await g.create("c1")
    await opened(g, "c1")
    host, port = g.sidecar.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {EVENTS.format('c1')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await eventually(lambda: fanout(g).clients() == 1)
        url = g.url(EVENTS.format("c1"))
        async with stream(http, url) as fast:
            await fast.next()
            await eventually(lambda: fanout(g).clients() == 2)
            big = "x" * 64 * 1024
            for n in range(400):  # 25 MiB: more than any socket buffer holds
                g.fake.broadcast("c1", {"type": "message_added", "n": n, "pad": big})
                if n % 50 == 0:
                    await asyncio.sleep(0)
            got = []
            while len(got) < 400:
                sse = await fast.next(timeout=10)
                if kind(sse) == "message_added":
                    got.append(json.loads(sse.data)["n"])
            assert got == list(range(400))  # every one, in order
        hub = fanout(g).hubs["c1"]
        assert hub.dropped == 1
        assert g.sidecar.snapshot("c1").stream == "live"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_client_that_resumes_gets_exactly_what_it_missed(gptme, http) -> None:
    g = await gptme("0.35.1")
    await g.create("c1")
    await opened(g, "c1")
    url = g.url(EVENTS.format("c1"))
    async with stream(http, url) as reader:
        await reader.next()
        g.fake.broadcast("c1", {"type": "message_added", "n": 0})
        (*_, last) = await reader.until("message_added")
    for n in range(1, 6):
        g.fake.broadcast("c1", {"type": "message_added", "n": n})
    hub = fanout(g).hubs["c1"]
    await eventually(lambda: hub.seq >= int(last.id.rpartition("-")[2]) + 5)
    async with stream(http, url, {"Last-Event-ID": last.id}) as again:
        missed = [await again.next() for _ in range(5)]
        assert [json.loads(e.data)["n"] for e in missed] == [1, 2, 3, 4, 5]
        numbers = [int(e.id.rpartition("-")[2]) for e in missed]
        assert numbers == list(range(numbers[0], numbers[0] + 5))
        assert numbers[0] == int(last.id.rpartition("-")[2]) + 1  # nothing twice
        g.fake.broadcast("c1", {"type": "message_added", "n": 6})
        (after,) = await again.until("message_added")
        assert json.loads(after.data)["n"] == 6


@pytest.mark.parametrize("stale", ["0000-1", "other-epoch-3", "garbage", "old"])
async def test_an_id_the_buffer_cannot_answer_gets_the_state_and_is_told(
    gptme, http, stale: str
) -> None:
    g = await gptme("0.35.1", sidecar_options={"fan_out_replay": 3})
    await g.create("c1")
    await opened(g, "c1")
    url = g.url(EVENTS.format("c1"))
    if stale == "old":
        async with stream(http, url) as reader:
            stale = (await reader.next()).id
        for n in range(6):  # more than the buffer keeps
            g.fake.broadcast("c1", {"type": "message_added", "n": n})
        hub = fanout(g).hubs["c1"]
        await eventually(lambda: hub.seq >= int(stale.rpartition("-")[2]) + 6)
    async with stream(http, url, {"Last-Event-ID": stale}) as reader:
        first, told = await reader.next(), await reader.next()
    assert kind(first) == "connected" and first.id
    assert told.event == "sidecar-resync"
    assert json.loads(told.data)["type"] == "sidecar-resync"


async def test_a_reconnect_of_the_upstream_stream_reaches_clients_as_a_new_connected(
    gptme, http
) -> None:
    g = await gptme("0.35.1")
    await g.create("c1")
    await opened(g, "c1")
    async with stream(http, g.url(EVENTS.format("c1"))) as reader:
        first = json.loads((await reader.next()).data)
        g.fake.drop_streams()
        events = await reader.until("connected", timeout=10)
    again = json.loads(events[-1].data)
    assert again["session_id"] != first["session_id"]  # the sidecar's new session
    assert again["session_id"] in g.fake.sessions


async def test_a_client_joining_mid_step_is_told_it_generates(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome(tokens=200, pace=0.02))
    sid = await g.create("c1")
    await opened(g, "c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "generating")
    async with stream(http, g.url(EVENTS.format("c1"))) as reader:
        connected = json.loads((await reader.next()).data)
    assert connected["type"] == "connected" and connected["generating"] is True
    # The sidecar's own session, as the upstream named it.
    assert connected["session_id"] in g.fake.sessions and connected["session_id"] != sid


def test_the_replay_buffers_of_every_conversation_are_bounded_together() -> None:
    """Each conversation's buffer keeps replay_bytes at most, and all of
    them together replay_total_bytes: past it, the hub holding the most lets
    its oldest events go, so many streams cannot hold replay_bytes each."""
    from types import SimpleNamespace

    from sidecar.core.sse import ServerSentEvent
    from sidecar.proxy.fanout import FanOutSettings, Hub, _Budget

    settings = FanOutSettings(replay_bytes=10_000, replay_total_bytes=15_000)
    budget = _Budget()
    hubs = []
    for n in range(3):
        sub = SimpleNamespace(listeners=[], first_event=None, key=f"c{n}")
        hub = Hub(sub, settings, lambda block: None, budget)  # type: ignore[arg-type]
        hubs.append(hub)
        for _ in range(100):
            hub.event(sub, ServerSentEvent(data="x" * 200))  # type: ignore[arg-type]
        assert hub._buffer_bytes <= settings.replay_bytes
    assert budget.held <= settings.replay_total_bytes
    assert budget.held == sum(h._buffer_bytes for h in hubs)
    # The newest events of the newest hub are the ones kept: a client of it
    # that missed the last one gets it.
    last = hubs[-1]
    assert last._missed(last.event_id(last.seq - 1)) == [last._buffer[-1][1]]
    hubs[0].release()
    assert budget.held == sum(h._buffer_bytes for h in hubs[1:])
