"""Conformance: fan-out against the released gptme servers (0.31.0, 0.35.1).

Through the sidecar, every client's ``/events`` of a conversation is served
from the sidecar's own stream: the tabs share the sidecar's gptme session,
which the ``connected`` event names. Each test drives the work with that
shared session id from the clients' side (a step, a tool confirmed or
skipped, an interrupt) and checks that gptme takes it and that every tab
sees what follows. A client that comes back with ``Last-Event-ID`` gets the
events it missed, as a tab that stayed saw them.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from ..proxy.test_fanout import Reader, kind, stream
from . import servers
from .test_real_gptme import Gptme, gptme  # noqa: F401 (the fixture)

pytestmark = [
    pytest.mark.parametrize("version", servers.GPTME_VERSIONS),
    pytest.mark.flaky(reruns=2, only_rerun=servers.UPSTREAM_FAULTS),
]


async def tabs(
    g: Gptme, cid: str, n: int, stack: contextlib.AsyncExitStack
) -> tuple[list[Reader], str]:
    """``n`` clients on the conversation's stream, and the session they share."""
    await g.live(cid)
    url = g.conversation_url(cid) + "/events"
    readers = [await stack.enter_async_context(stream(g.http, url, g.headers)) for _ in range(n)]
    firsts = [await r.next(timeout=10) for r in readers]
    assert all(kind(f) == "connected" and f.id for f in firsts)  # the sidecar's ids
    (session,) = {json.loads(f.data)["session_id"] for f in firsts}
    return readers, session


async def test_a_step_from_any_tab_with_the_shared_session(gptme: Gptme) -> None:  # noqa: F811
    cid, own = await gptme.create("ok")
    async with contextlib.AsyncExitStack() as stack:
        readers, shared = await tabs(gptme, cid, 3, stack)
        assert shared != own  # the sidecar's session, not the creator's
        assert await gptme.step(cid, shared) == 200
        for reader in readers:
            events = await reader.until("generation_complete", timeout=20)
            assert "generation_started" in [kind(e) for e in events]
        await gptme.poller.wait(cid, "completed")


@pytest.mark.parametrize("action", ["confirm", "skip"])
async def test_a_tool_confirmed_or_skipped_with_the_shared_session(
    gptme: Gptme,  # noqa: F811
    action: str,
) -> None:
    cid, _ = await gptme.create("tool")
    async with contextlib.AsyncExitStack() as stack:
        readers, shared = await tabs(gptme, cid, 2, stack)
        assert await gptme.step(cid, shared) == 200
        pendings = [(await r.until("tool_pending", timeout=20))[-1] for r in readers]
        (tool_id,) = {json.loads(p.data)["tool_id"] for p in pendings}
        await gptme.poller.wait(cid, "awaiting_tool")
        body = {"session_id": shared, "tool_id": tool_id, "action": action}
        status, answer = await gptme.post(cid, "/tool/confirm", body)
        assert status == 200, answer
        for reader in readers:  # the generation that follows, on every tab
            await reader.until("generation_started", timeout=20)
            await reader.until("generation_complete", timeout=20)
        state = await gptme.poller.wait(cid, "completed")
    assert state["pending_tools"] == []


async def test_an_interrupt_with_the_shared_session(gptme: Gptme) -> None:  # noqa: F811
    cid, _ = await gptme.create("slow")
    async with contextlib.AsyncExitStack() as stack:
        readers, shared = await tabs(gptme, cid, 2, stack)
        assert await gptme.step(cid, shared) == 200
        for reader in readers:
            await reader.until("generation_progress", timeout=20)
        status, answer = await gptme.post(cid, "/interrupt", {"session_id": shared})
        assert status == 200, answer
        state = await gptme.poller.wait(cid, "interrupted")
    assert state["generating"] is False


async def test_a_tab_that_comes_back_gets_what_it_missed(gptme: Gptme) -> None:  # noqa: F811
    cid, _ = await gptme.create("ok")
    async with contextlib.AsyncExitStack() as stack:
        (stayed,), shared = await tabs(gptme, cid, 1, stack)
        url = gptme.conversation_url(cid) + "/events"
        async with stream(gptme.http, url, gptme.headers) as leaving:
            last = await leaving.next(timeout=10)
        assert await gptme.step(cid, shared) == 200
        seen = await stayed.until("generation_complete", timeout=20)
        headers = {**gptme.headers, "Last-Event-ID": last.id}
        async with stream(gptme.http, url, headers) as back:
            replayed = [await back.next(timeout=10) for _ in seen]
    # Exactly what the tab that stayed saw, with the same ids, in order.
    assert [(e.id, e.data) for e in replayed] == [(e.id, e.data) for e in seen]
    assert "generation_complete" in [kind(e) for e in replayed]
