"""Conformance: the sidecar in front of the released opencode server (1.18.33).

The server is installed from npm and started by the fixtures in
``conftest.py``, with the fake model of ``tests/real/model.py`` as its
provider and ``bash`` set to ask for permission. One shared ``/event`` stream
carries every session's events; a witness reads it directly, keeping the
events of the scenario's session, so a failure shows them beside the
sidecar's snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from . import servers
from .harness import Poller, Witness


class Opencode:
    def __init__(self, upstream: servers.Process, sidecar: Any, http: aiohttp.ClientSession):
        self.upstream = upstream
        self.sidecar = sidecar
        self.http = http
        self.poller = Poller(http, self.session_url, "sidecar", {}, sidecar)

    def session_url(self, sid: str, direct: bool = False) -> str:
        return f"{self.upstream.url if direct else self.sidecar.url}/session/{sid}"

    async def create(self, direct: bool = False) -> str:
        base = self.upstream.url if direct else self.sidecar.url
        async with self.http.post(base + "/session", json={}) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["id"])

    async def prompt(self, sid: str, scenario: str, direct: bool = False) -> None:
        parts = [{"type": "text", "text": f"please scenario:{scenario} ({sid})"}]
        url = self.session_url(sid, direct) + "/prompt_async"
        async with self.http.post(url, json={"parts": parts}) as resp:
            assert resp.status == 204, await resp.text()

    def witness(self, sid: str) -> Witness:
        def mine(event: dict[str, Any]) -> bool:
            return (event.get("properties") or {}).get("sessionID") == sid

        return Witness(self.http, self.upstream.url + "/event", {}, keep=mine)

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.post(self.sidecar.url + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def opencode(
    real_opencode: servers.Process, start_sidecar: Any, http: aiohttp.ClientSession
) -> AsyncIterator[Opencode]:
    real_opencode.running()
    sidecar = await start_sidecar(real_opencode.url, profile="opencode", confirm_timeout=2.0)
    yield Opencode(real_opencode, sidecar, http)


async def test_a_failed_prompt_is_readable_as_state(opencode: Opencode) -> None:
    sid = await opencode.create()
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "401")
        state = await opencode.poller.wait(sid, "failed", witness)
        # opencode follows the failure with idle statuses: they erase nothing.
        await witness.wait_for("session.idle")
        await asyncio.sleep(0.5)
        state = await opencode.poller.state(sid)
    assert (state["status"], state["generating"]) == ("failed", False), witness.text()
    assert "Incorrect API key" in state["last_error"]
    assert state["id"] == sid
    async with opencode.http.get(opencode.session_url(sid, direct=True)) as direct:
        assert "Incorrect API key" not in await direct.text()  # the upstream never says


async def test_work_in_progress_reads_generating_then_an_abort_is_interrupted(
    opencode: Opencode,
) -> None:
    sid = await opencode.create()
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "slow")
        await opencode.poller.wait(sid, "generating", witness)
        for _ in range(5):
            state = await opencode.poller.state(sid)
            assert state["generating"] is True, opencode.poller.explain(sid, "", state, witness)
            await asyncio.sleep(0.1)
        assert (await opencode.post(f"/session/{sid}/abort"))[0] == 200
        await opencode.poller.wait(sid, "interrupted", witness)
        await witness.wait_for("session.idle")
        await asyncio.sleep(0.5)
        state = await opencode.poller.state(sid)
    assert (state["status"], state["generating"], state["last_error"]) == (
        "interrupted",
        False,
        None,
    ), witness.text()


async def test_a_new_prompt_after_a_failure_recovers(opencode: Opencode) -> None:
    sid = await opencode.create()
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "failfirst")
        await opencode.poller.wait(sid, "failed", witness)
        await asyncio.sleep(1.6)
        await opencode.prompt(sid, "ok")
        state = await opencode.poller.wait(sid, "completed", witness)
    assert state["last_error"] is None


async def test_a_retry_is_visible_while_the_work_goes_on(opencode: Opencode) -> None:
    sid = await opencode.create()
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "429")  # the model says "rate limited", every time
        state = await opencode.poller.wait(sid, lambda s: s["retry"] is not None, witness)
        retry_event = await witness.wait_for("session.status")
        assert retry_event is not None
        assert state["generating"] is True and state["status"] == "generating"
        assert state["retry"]["attempt"] >= 1
        assert state["retry"]["message"]
        assert state["retry"]["next_at"].endswith("Z")
        await opencode.post(f"/session/{sid}/abort")
        state = await opencode.poller.wait(sid, "interrupted", witness)
    assert state["retry"] is None


@pytest.mark.parametrize(("reply", "ends"), [("once", "completed"), ("reject", "interrupted")])
async def test_a_permission_request_waits_for_a_human(
    opencode: Opencode, reply: str, ends: str
) -> None:
    sid = await opencode.create()
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "tool")
        asked = await witness.wait_for("permission.asked")
        state = await opencode.poller.wait(sid, "awaiting_tool", witness)
        assert state["generating"] is False
        async with opencode.http.get(opencode.sidecar.url + "/permission") as resp:
            listed = [p["id"] for p in await resp.json() if p["sessionID"] == sid]
        assert [t["id"] for t in state["pending_tools"]] == listed == [asked["properties"]["id"]]
        status, _ = await opencode.post(f"/permission/{listed[0]}/reply", {"reply": reply})
        assert status == 200
        state = await opencode.poller.wait(sid, ends, witness)
        await witness.wait_for("session.idle")
        await asyncio.sleep(0.3)
        state = await opencode.poller.state(sid)
    assert (state["status"], state["pending_tools"]) == (ends, []), witness.text()


async def test_twenty_sessions_at_once_half_failing(opencode: Opencode) -> None:
    sessions = [await opencode.create() for _ in range(20)]
    await opencode.poller.wait(sessions[0], lambda s: s["stream"] == "live", timeout=10)
    await asyncio.gather(
        *(opencode.prompt(sid, "401" if i % 2 else "ok") for i, sid in enumerate(sessions))
    )
    for i, sid in enumerate(sessions):
        state = await opencode.poller.wait(sid, "failed" if i % 2 else "completed", timeout=60)
        assert bool(state["last_error"]) == bool(i % 2)
    assert len(opencode.sidecar.registry.subscriptions) == 1  # one shared stream


async def test_work_started_directly_at_the_upstream_is_seen(opencode: Opencode) -> None:
    seen = await opencode.create()
    await opencode.poller.wait(seen, lambda s: s["stream"] == "live", timeout=10)
    sid = await opencode.create(direct=True)
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "401", direct=True)
        state = await opencode.poller.wait(sid, "failed", witness)
    assert "Incorrect API key" in state["last_error"]


async def test_a_session_first_read_on_the_live_stream_is_live(opencode: Opencode) -> None:
    first = await opencode.create()
    await opencode.poller.wait(first, lambda s: s["stream"] == "live", timeout=10)
    later = await opencode.create(direct=True)
    state = await opencode.poller.state(later)
    assert (state["stream"], state["id"], state["status"]) == ("live", later, "unknown")


async def test_session_status_is_passed_through_not_enriched(opencode: Opencode) -> None:
    sid = await opencode.create()
    await opencode.prompt(sid, "slow")
    await opencode.poller.wait(sid, "generating")
    async with opencode.http.get(opencode.sidecar.url + "/session/status") as resp:
        via = await resp.json()
    assert sid in via and "sidecar" not in via
    assert opencode.sidecar.registry.get("status") is None
    await opencode.post(f"/session/{sid}/abort")


async def test_upstream_killed_mid_run_and_restarted_ends_failed(opencode: Opencode) -> None:
    sid = await opencode.create()
    await opencode.prompt(sid, "slow")
    await opencode.poller.wait(sid, "generating")
    opencode.upstream.kill()
    await asyncio.sleep(0.2)
    snap = opencode.sidecar.snapshot(sid)
    assert (snap.generating, snap.stream) == (True, "reconnecting")
    # opencode keeps sessions across a restart but drops the run silently;
    # it also accepts connections before it answers them (the stream's
    # head timeout covers that).
    opencode.upstream.start()
    state = await opencode.poller.wait(sid, "failed", timeout=30)
    assert "no sign of the step" in state["last_error"]
    assert state["stream"] == "live"


async def test_other_requests_pass_through_unchanged(opencode: Opencode) -> None:
    sid = await opencode.create()
    for path in (f"/session/{sid}/message", "/permission", "/config"):
        async with opencode.http.get(opencode.upstream.url + path) as direct:
            want = (direct.status, await direct.read())
        async with opencode.http.get(opencode.sidecar.url + path) as via:
            assert (via.status, await via.read()) == want, path
    # The list is the list of sessions: each observed one carries its
    # snapshot (test_real_lists.py); the rest is the upstream's.
    async with opencode.http.get(opencode.upstream.url + "/session") as direct:
        want_list = await direct.json()
    async with opencode.http.get(opencode.sidecar.url + "/session") as via:
        got_list = await via.json()
    assert [{k: v for k, v in item.items() if k != "sidecar"} for item in got_list] == want_list
    async with opencode.http.get(opencode.session_url(sid, direct=True)) as direct:
        want_body = await direct.json()
    got = await opencode.poller.body(sid)
    got.pop("sidecar")
    assert got == want_body
    # The shared stream through the sidecar carries what the upstream sends.
    through = Witness(
        opencode.http,
        opencode.sidecar.url + "/event",
        {},
        keep=lambda e: (e.get("properties") or {}).get("sessionID") == sid,
    )
    async with opencode.witness(sid) as witness, through:
        await opencode.prompt(sid, "ok")
        await witness.wait_for("session.idle")
        await through.wait_for("session.idle")
        await asyncio.sleep(0.5)
    via, direct = [e for _, e in through.events], [e for _, e in witness.events]
    common = min(len(via), len(direct))  # a late title update may reach one first
    assert via[:common] == direct[:common]
    assert "session.idle" in [e["type"] for e in via[:common]]


async def test_a_model_that_keeps_refusing_fails_after_its_retries(opencode: Opencode) -> None:
    sid = await opencode.create()
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "429")  # rate limited, every time
        retrying = await opencode.poller.wait(sid, lambda s: s["retry"] is not None, witness)
        assert retrying["generating"] is True
        state = await opencode.poller.wait(sid, "failed", witness, timeout=30)
    # opencode 1.18.33 tries 5 times, about a second apart, then reports it.
    attempts = [
        e["properties"]["status"]["attempt"]
        for _, e in witness.events
        if e["type"] == "session.status" and e["properties"]["status"]["type"] == "retry"
    ]
    assert attempts == [1, 2, 3, 4, 5], witness.text()
    assert state["last_error"] == "Rate limit reached" and state["retry"] is None
