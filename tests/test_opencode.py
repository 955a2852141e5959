"""The second profile: an opencode-style server with one shared event stream."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.fake import INVALID_KEY_ERROR, FakeOpencode, Outcome

from .conftest import eventually

PROFILE = str(Path(__file__).resolve().parent.parent / "config" / "opencode.toml")


@pytest.fixture
def opencode(serve, start_sidecar, http):
    async def start(outcome: Outcome):
        fake = FakeOpencode(outcome=outcome)
        upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
        sc = await start_sidecar(upstream, profile=PROFILE)
        return fake, upstream, sc

    return start


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
