"""Conformance: a client's own event stream opened late, through the sidecar, is
told the conversation's state first (``[stream.join]``).

gptme 0.35.1's ``connected`` carries ``generating`` and ``pending_tools``
of the session each ``/events`` creates for itself, not of the one that
steps: direct, a stream opened mid-step reads ``generating: false``.
Through the sidecar those fields are the conversation's, and ``session_id``
stays the upstream's. 0.31.0's ``connected`` has no such fields: it passes
as it came.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from . import servers
from .test_real_gptme import Gptme, gptme  # noqa: F401 (the fixture)

pytestmark = [
    pytest.mark.parametrize("version", servers.GPTME_VERSIONS),
    pytest.mark.flaky(reruns=2, only_rerun=servers.UPSTREAM_FAULTS),
]


async def first_event(g: Gptme, cid: str, direct: bool = False) -> tuple[bytes, dict[str, Any]]:
    """The first event of a new ``/events`` of the conversation, raw and read."""
    url = g.conversation_url(cid, direct) + "/events"
    timeout = aiohttp.ClientTimeout(total=10)
    async with g.http.get(url, headers=g.headers, timeout=timeout) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        block = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
    if not direct:  # fanned out: the sidecar's id, then the upstream's bytes
        id_line, _, block = block.partition(b"\n")
        assert id_line.startswith(b"id: "), id_line
    assert block.startswith(b"data: "), block
    return block, orjson.loads(block[len(b"data: ") :])


async def test_a_stream_opened_mid_step_is_told_it_generates(gptme: Gptme) -> None:  # noqa: F811
    cid, sid = await gptme.create("slow")
    async with gptme.witness(cid) as witness:
        assert await gptme.step(cid, sid) == 200
        await witness.wait_for("generation_progress")
        await gptme.poller.wait(cid, "generating", witness)
        _, own = await first_event(gptme, cid, direct=True)
        _, told = await first_event(gptme, cid)
        state = await gptme.poller.state(cid)
        status, _ = await gptme.post(cid, "/interrupt", {"session_id": sid})
        assert status == 200
    assert state["generating"] is True  # still at work after the stream was read
    assert told["type"] == own["type"] == "connected"
    assert isinstance(told["session_id"], str) and told["session_id"] not in (sid, "")
    # Direct, each stream makes a session; through the sidecar (fanned out)
    # every client is told the sidecar's own.
    assert told["session_id"] != own["session_id"]
    if gptme.modern:
        assert own["generating"] is False  # the new session's, not the conversation's
        assert told["generating"] is True
        assert told.keys() == own.keys()  # nothing added, nothing lost
        assert told["pending_tools"] == [] and told["last_error"] is None
    else:
        assert told.keys() == own.keys() == {"type", "session_id"}  # as it came


async def test_a_stream_opened_while_a_tool_waits_is_told_the_tool(gptme: Gptme) -> None:  # noqa: F811
    cid, sid = await gptme.create("tool")
    async with gptme.witness(cid) as witness:
        assert await gptme.step(cid, sid) == 200
        pending = await witness.wait_for("tool_pending")
        await gptme.poller.wait(cid, "awaiting_tool", witness)
        _, own = await first_event(gptme, cid, direct=True)
        _, told = await first_event(gptme, cid)
        body = {"session_id": sid, "tool_id": pending["tool_id"], "action": "skip"}
        status, _ = await gptme.post(cid, "/tool/confirm", body)
        assert status == 200
    if gptme.modern:
        assert own["pending_tools"] == []  # the new session has none
        assert told["generating"] is False
        (tool,) = told["pending_tools"]
        # gptme's own shape, as its connected event and tool_pending have it.
        assert tool == {k: v for k, v in pending.items() if k != "type"}
        assert tool["tool_id"] == pending["tool_id"] and tool["tooluse"]["tool"] == "shell"
    else:
        assert told.keys() == {"type", "session_id"}


async def test_a_stream_of_a_conversation_never_stepped_passes_as_it_came(gptme: Gptme) -> None:  # noqa: F811
    cid, _ = await gptme.create("ok")
    await gptme.live(cid)
    raw, told = await first_event(gptme, cid)
    # Nothing is known of the work yet (unknown, or idle with nothing to change):
    # the upstream's own bytes.
    assert told["type"] == "connected"
    if gptme.modern:
        assert told["generating"] is False and told["pending_tools"] == []
        assert raw.startswith(b'data: {"type": "connected", "session_id": ')  # gptme's spelling
