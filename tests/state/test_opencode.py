"""The second profile: an opencode-style server with one shared event stream."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.demo.fake import INVALID_KEY_ERROR, FakeOpencode, Outcome

from ..conftest import eventually


@pytest.fixture
def opencode(serve, start_sidecar, http):
    async def start(outcome: Outcome, **options):
        fake = FakeOpencode(outcome=outcome, **options)
        upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
        sc = await start_sidecar(upstream, profile="opencode")
        return fake, upstream, sc

    return start


async def state(http, sc, sid: str) -> dict:
    async with http.get(f"{sc.url}/session/{sid}") as resp:
        assert resp.status == 200
        return dict((await resp.json())["sidecar"])


async def prompt(http, base: str, sid: str) -> None:
    async with http.post(f"{base}/session/{sid}/prompt_async", json={"parts": []}) as resp:
        assert resp.status == 204


async def create(http, base: str) -> str:
    async with http.post(base + "/session", json={}) as resp:
        return str((await resp.json())["id"])


async def test_a_session_error_the_upstream_never_shows_is_readable(opencode, http) -> None:
    _, upstream, sc = await opencode(Outcome(kind="error", error_after=2, start_delay=0.05))
    sid = await create(http, sc.url)
    async with http.post(f"{sc.url}/session/{sid}/prompt_async", json={"parts": []}) as resp:
        assert resp.status == 204
    async with http.get(f"{sc.url}/session/{sid}") as resp:
        assert (await resp.json())["sidecar"]["generating"] is True
    await eventually(lambda: sc.snapshot(sid).status == "failed")
    async with http.get(f"{sc.url}/session/{sid}") as resp:
        state = (await resp.json())["sidecar"]
    assert state["last_error"] == INVALID_KEY_ERROR
    async with http.get(f"{upstream}/session/{sid}") as resp:
        assert "error" not in await resp.text()  # the upstream alone never says


async def test_one_shared_stream_serves_every_session(opencode, http) -> None:
    fake, _, sc = await opencode(Outcome(tokens=3, pace=0.01))
    sessions = [await create(http, sc.url) for _ in range(3)]
    for sid in sessions:
        async with http.post(f"{sc.url}/session/{sid}/prompt_async", json={}) as resp:
            assert resp.status == 204
    for sid in sessions:
        await eventually(lambda sid=sid: sc.snapshot(sid).status == "completed")
    assert len(sc.registry.subscriptions) == 1
    assert len([p for m, p in fake.requests if p == "/event"]) == 1


async def test_work_started_elsewhere_is_seen_on_the_shared_stream(opencode, http) -> None:
    _, upstream, sc = await opencode(Outcome(kind="error", start_delay=0.05))
    seen = await create(http, sc.url)
    async with http.get(f"{sc.url}/session/{seen}") as resp:  # opens the shared stream
        assert resp.status == 200
    await eventually(lambda: sc.registry.subscriptions and sc.registry.subscriptions[0].live)
    other = await create(http, upstream)
    async with http.post(f"{upstream}/session/{other}/prompt_async", json={}) as resp:
        assert resp.status == 204  # straight to the upstream, not through the sidecar
    await eventually(
        lambda: sc.snapshot(other) is not None and sc.snapshot(other).status == "failed"
    )
    async with http.get(f"{sc.url}/session/{other}") as resp:
        assert (await resp.json())["sidecar"]["status"] == "failed"


async def test_session_status_is_not_a_session(opencode, http) -> None:
    _, upstream, sc = await opencode(Outcome(tokens=20, pace=0.05))
    sid = await create(http, sc.url)
    await prompt(http, sc.url, sid)
    async with http.get(f"{sc.url}/session/status") as resp:
        via = await resp.json()
    async with http.get(f"{upstream}/session/status") as resp:
        direct = await resp.json()
    assert via == direct == {sid: {"type": "busy"}}  # passed through, nothing merged
    assert sc.registry.get("status") is None


async def test_the_snapshot_names_its_session(opencode, http) -> None:
    _, _, sc = await opencode(Outcome())
    sid = await create(http, sc.url)
    assert (await state(http, sc, sid))["id"] == sid


async def test_a_session_first_read_on_a_live_shared_stream_is_live(opencode, http) -> None:
    _, _, sc = await opencode(Outcome())
    first = await create(http, sc.url)
    await state(http, sc, first)
    await eventually(lambda: sc.snapshot(first).stream == "live")
    second = await create(http, sc.url)
    assert (await state(http, sc, second))["stream"] == "live"


async def test_an_abort_ends_interrupted(opencode, http) -> None:
    _, _, sc = await opencode(Outcome(tokens=200, pace=0.02))
    sid = await create(http, sc.url)
    await prompt(http, sc.url, sid)
    await eventually(lambda: sc.snapshot(sid).status == "generating")
    async with http.post(f"{sc.url}/session/{sid}/abort") as resp:
        assert resp.status == 200
    await eventually(lambda: sc.snapshot(sid).status == "interrupted")
    await asyncio.sleep(0.1)  # the idle statuses that follow change nothing
    got = await state(http, sc, sid)
    assert (got["status"], got["generating"], got["last_error"]) == ("interrupted", False, None)


async def test_a_retry_is_visible_while_work_goes_on(opencode, http) -> None:
    _, _, sc = await opencode(Outcome(tokens=2, pace=0.3), retries=1)
    sid = await create(http, sc.url)
    await prompt(http, sc.url, sid)
    await eventually(lambda: sc.snapshot(sid).retry is not None)
    got = await state(http, sc, sid)
    assert got["generating"] is True
    assert got["retry"]["attempt"] == 1 and got["retry"]["message"] == "Rate limit"
    await eventually(lambda: sc.snapshot(sid).status == "completed", timeout=5)
    assert (await state(http, sc, sid))["retry"] is None


async def test_a_permission_request_waits_for_a_human(opencode, http) -> None:
    _, _, sc = await opencode(Outcome(kind="tool", tokens=1))
    sid = await create(http, sc.url)
    await prompt(http, sc.url, sid)
    await eventually(lambda: sc.snapshot(sid).status == "awaiting_tool")
    got = await state(http, sc, sid)
    async with http.get(f"{sc.url}/permission") as resp:
        pending = await resp.json()
    assert [t["id"] for t in got["pending_tools"]] == [p["id"] for p in pending]
    assert got["generating"] is False
    async with http.post(f"{sc.url}/permission/{pending[0]['id']}/reply", json={"reply": "once"}):
        pass
    await eventually(lambda: sc.snapshot(sid).status == "completed")
    assert (await state(http, sc, sid))["pending_tools"] == []


async def test_a_session_created_through_the_sidecar_is_observed_at_once(opencode, http) -> None:
    fake, _, sc = await opencode(Outcome())
    sid = await create(http, sc.url)
    await eventually(lambda: sc.snapshot(sid) is not None and sc.snapshot(sid).stream == "live")
    assert [p for m, p in fake.requests if p == "/event"] == ["/event"]  # before any prompt
