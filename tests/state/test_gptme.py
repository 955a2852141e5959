"""The sidecar in front of a fake gptme server: what a polling client sees."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.demo.fake import INVALID_KEY_ERROR, Outcome

from ..conftest import eventually

pytestmark = pytest.mark.parametrize("version", ["0.31.0", "0.35.1"])


async def test_error_after_step_is_visible_to_poller(gptme, version: str) -> None:
    g = await gptme(version, outcome=Outcome(kind="error", error_after=2))
    sid = await g.create("c1")
    resp = await g.step("c1", sid)
    assert resp.status == 200  # the error comes after tokens: the step was accepted
    session = await g.wait_status("c1", "failed")
    assert session["generating"] is False
    assert session["last_error"] == INVALID_KEY_ERROR
    # Direct to 0.31.0, nothing at all says so: the silent failure.
    if version == "0.31.0":
        assert "session" not in await g.get("c1", direct=True)


async def test_generating_is_true_in_a_get_right_after_step_returns(gptme, version: str) -> None:
    g = await gptme(version, outcome=Outcome(tokens=50, pace=0.05, start_delay=0.3))
    sid = await g.create("c1")
    resp = await g.step("c1", sid)
    assert resp.status == 200
    session = await g.session("c1")
    assert session["generating"] is True
    assert session["status"] in ("starting", "generating")


async def test_success_ends_completed_with_the_reply_in_the_log(gptme, version: str) -> None:
    g = await gptme(version, outcome=Outcome(tokens=3, pace=0.01))
    sid = await g.create("c1")
    await g.step("c1", sid)
    session = await g.wait_status("c1", "completed")
    assert session["generating"] is False and session["last_error"] is None
    body = await g.get("c1")
    assert body["log"][-1]["role"] == "assistant"


async def test_a_second_sse_observer_does_not_hide_the_error(gptme, version: str, http) -> None:
    g = await gptme(version, outcome=Outcome(kind="error", start_delay=0.1))
    sid = await g.create("c1")
    # A second browser tab subscribes directly to the upstream.
    async with http.get(g.url("/api/v2/conversations/c1/events", direct=True)) as tab:
        await tab.content.readline()
        await g.step("c1", sid)
        session = await g.wait_status("c1", "failed")
        assert session["last_error"] == INVALID_KEY_ERROR
        if version == "0.35.1":
            # The upstream's own field is wrong here: it reports an observer.
            own = (await g.get("c1", direct=True))["session"]
            assert own["last_error"] is None


async def test_tool_confirmation_is_readable_as_state(gptme, version: str) -> None:
    g = await gptme(version, outcome=Outcome(kind="tool", tokens=2))
    sid = await g.create("c1")
    await g.step("c1", sid)
    session = await g.wait_status("c1", "awaiting_tool")
    assert session["generating"] is False
    (tool,) = session["pending_tools"]
    async with g.http.post(
        g.url("/api/v2/conversations/c1/tool/confirm"),
        json={"session_id": sid, "tool_id": tool["tool_id"], "action": "confirm"},
    ) as resp:
        assert resp.status == 200
    session = await g.wait_status("c1", "completed")
    assert session["pending_tools"] == []


async def test_interrupt_is_readable_as_state(gptme, version: str) -> None:
    g = await gptme(version, outcome=Outcome(tokens=500, pace=0.02))
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "generating")
    async with g.http.post(
        g.url("/api/v2/conversations/c1/interrupt"), json={"session_id": sid}
    ) as resp:
        assert resp.status == 200
    session = await g.wait_status("c1", "interrupted")
    assert session["generating"] is False


async def test_a_rejected_step_keeps_the_previous_state(gptme, version: str) -> None:
    g = await gptme(version, outcome=Outcome(kind="error", start_delay=0.05))
    sid = await g.create("c1")
    await g.step("c1", sid)
    before = await g.wait_status("c1", "failed")
    resp = await g.step("c1", "no-such-session")
    assert resp.status == 404
    after = await g.session("c1")
    assert (after["status"], after["last_error"]) == ("failed", before["last_error"])
    assert after["updated_at"] == before["updated_at"]


async def test_a_conversation_first_seen_through_get_is_unknown_not_idle(
    gptme, version: str
) -> None:
    g = await gptme(version)
    await g.create("c1", direct=True)
    session = await g.session("c1")
    assert session["status"] == "unknown"
    assert session["stream"] in ("connecting", "live")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    assert (await g.session("c1"))["status"] == "unknown"


async def test_a_404_from_the_upstream_passes_through_unchanged(gptme, version: str, http) -> None:
    g = await gptme(version)
    async with http.get(g.url("/api/v2/conversations/nope")) as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "Conversation not found: nope"}


async def test_the_step_is_only_forwarded_once_the_stream_is_live(gptme, version: str) -> None:
    g = await gptme(version, outcome=Outcome(kind="error"))  # the error comes at once
    sid = await g.create("c1")
    await g.step("c1", sid)
    assert [m for m, p in g.fake.requests if p.endswith("/events")]
    events_at = next(i for i, (m, p) in enumerate(g.fake.requests) if p.endswith("/events"))
    step_at = next(i for i, (m, p) in enumerate(g.fake.requests) if p.endswith("/step"))
    assert events_at < step_at
    await g.wait_status("c1", "failed")


async def test_the_stream_reconnects_after_the_upstream_drops_it(gptme, version: str) -> None:
    g = await gptme(version, outcome=Outcome(kind="error", start_delay=0.05))
    sid = await g.create("c1")
    await g.session("c1")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    g.fake.drop_streams()
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "reconnecting")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")


async def test_a_silent_stream_is_detected_and_replaced(gptme, version: str) -> None:
    g = await gptme(version, heartbeat=0.1, sidecar_options={"stale_after": 0.4})
    await g.create("c1")
    await g.session("c1")
    sub = await eventually(lambda: g.sidecar.registry.get("c1").subscription)
    await eventually(lambda: sub.stream == "live")
    g.fake.go_silent()
    await eventually(lambda: sub.stream == "reconnecting", timeout=3)
    assert "no bytes" in (sub.last_failure or "")
    g.fake.go_silent(False)
    await eventually(lambda: sub.stream == "live", timeout=3)


async def test_hostile_ids_never_reach_other_upstream_paths(gptme, version: str, http) -> None:
    from yarl import URL

    g = await gptme(version)
    for raw in ("..%2F..%2Fadmin", "a%2Fb", "%2E%2E", "x" * 300, "a%0D%0AHost:%20evil"):
        url = URL(g.sidecar.url + "/api/v2/conversations/" + raw, encoded=True)
        async with http.get(url) as resp:
            assert resp.status == 404
    await asyncio.sleep(0.1)
    assert not [p for m, p in g.fake.requests if p.endswith("/events")]
    assert g.sidecar.registry.conversations() == []
