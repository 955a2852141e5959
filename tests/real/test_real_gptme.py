"""Conformance: the sidecar in front of the released gptme servers (0.31.0, 0.35.1).

Each scenario runs against the real server, installed from PyPI and started
by the fixtures in ``conftest.py``, with the fake model of
``tests/real/model.py`` behind it (the newest user message says what the
model does: ``scenario:401``, ``scenario:tool``...). A poller reads the
sidecar's snapshot as a REST client would; a witness reads the upstream's own
event stream directly, so a failure shows both.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.http import codings

from ..conftest import eventually
from . import servers
from .harness import Poller, Witness

pytestmark = [
    pytest.mark.parametrize("version", servers.GPTME_VERSIONS),
    pytest.mark.flaky(reruns=2, only_rerun=servers.UPSTREAM_FAULTS),
]
_ids = itertools.count(1)


class Gptme:
    """A real gptme server, the sidecar in front, and clients for both."""

    def __init__(self, upstream: servers.Process, sidecar: Any, http: aiohttp.ClientSession):
        self.upstream = upstream
        self.sidecar = sidecar
        self.http = http
        self.headers = dict(upstream.headers)  # 0.35.1: its bearer token
        self.modern = upstream.name != "gptme-0.31.0"
        self.poller = Poller(http, self.conversation_url, "session", self.headers, sidecar)

    def conversation_url(self, cid: str, direct: bool = False) -> str:
        base = self.upstream.url if direct else self.sidecar.url
        return f"{base}/api/v2/conversations/{cid}"

    async def create(self, scenario: str, direct: bool = False) -> tuple[str, str]:
        cid = f"conf-{scenario}-{next(_ids)}-{int(time.time() * 1000) % 100000}"
        body = servers.gptme_conversation(cid, scenario)
        url = self.conversation_url(cid, direct)
        async with self.http.put(url, json=body, headers=self.headers) as resp:
            assert resp.status == 200, await resp.text()
            return cid, str((await resp.json())["session_id"])

    async def direct(self, cid: str) -> Any:
        """The conversation as gptme itself answers a GET. Its own 500 (the
        HTML one of 0.31.0 under concurrent GETs) fails with a message that
        ``servers.UPSTREAM_FAULTS`` reruns the scenario on."""
        url = self.conversation_url(cid, direct=True)
        async with self.http.get(url, headers=self.headers) as resp:
            text = await resp.text()
            assert resp.status == 200, f"GET {url}: {resp.status} {text[:80]}"
            return orjson.loads(text)

    def witness(self, cid: str) -> Witness:
        return Witness(self.http, self.conversation_url(cid, direct=True) + "/events", self.headers)

    async def post(
        self, cid: str, path: str, body: dict[str, Any], direct: bool = False
    ) -> tuple[int, Any]:
        url = self.conversation_url(cid, direct) + path
        async with self.http.post(url, json=body, headers=self.headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def step(self, cid: str, sid: str, direct: bool = False, **extra: Any) -> int:
        status, _ = await self.post(cid, "/step", {"session_id": sid, **extra}, direct)
        return status

    async def live(self, cid: str) -> None:
        """Read once through the sidecar and wait until its stream is live."""
        await self.poller.wait(cid, lambda s: s["stream"] == "live", timeout=10)


def two_answers(state: dict[str, Any], witness: Witness) -> bool:
    """Completed after the answer that follows a tool (the second one)."""
    return state["status"] == "completed" and witness.types().count("generation_complete") >= 2


@pytest.fixture
async def gptme(
    version: str, request: pytest.FixtureRequest, start_sidecar: Any, http: aiohttp.ClientSession
) -> AsyncIterator[Gptme]:
    upstream = request.getfixturevalue("real_gptme_" + version.replace(".", "_")).running()
    sidecar = await start_sidecar(upstream.url, confirm_timeout=2.0)
    yield Gptme(upstream, sidecar, http)


async def test_a_failed_step_is_readable_as_state(gptme: Gptme) -> None:
    cid, sid = await gptme.create("401")
    async with gptme.witness(cid) as witness:
        status = await gptme.step(cid, sid)
        # 0.31.0 accepts the step and fails later; 0.35.1 waits for the
        # early error and answers it with a 500.
        assert status == (500 if gptme.modern else 200)
        state = await gptme.poller.wait(cid, "failed", witness)
        await witness.wait_for("error")
    assert state["generating"] is False
    assert "Incorrect API key" in state["last_error"]
    own = (await gptme.direct(cid)).get("session")
    if not gptme.modern:
        assert own is None  # 0.31.0: nothing at all says it failed
    # (0.35.1's own field names whichever session was active last: the
    # stepping one here, an observer's in other runs. The sidecar's wins.)


async def test_work_in_progress_reads_generating_then_an_interrupt_stays(gptme: Gptme) -> None:
    cid, sid = await gptme.create("slow")
    async with gptme.witness(cid) as witness:
        assert await gptme.step(cid, sid) == 200
        for _ in range(5):  # still working: every poll says so
            state = await gptme.poller.state(cid)
            assert state["generating"] is True, gptme.poller.explain(cid, "", state, witness)
            await asyncio.sleep(0.1)
        await witness.wait_for("generation_progress")
        status, _ = await gptme.post(cid, "/interrupt", {"session_id": sid})
        assert status == 200
        await gptme.poller.wait(cid, "interrupted", witness)
        # The late events come within half a second (0.31.0: the cut-off
        # answer and generation_complete; 0.35.1: one flushed token).
        if not gptme.modern:
            await witness.wait_for("generation_complete")
        await asyncio.sleep(1.0)
        state = await gptme.poller.state(cid)
        assert (state["status"], state["generating"]) == ("interrupted", False), (
            gptme.poller.explain(cid, "after the late events", state, witness)
        )


async def test_a_new_step_after_a_failure_recovers(gptme: Gptme) -> None:
    cid, sid = await gptme.create("failfirst")  # the model fails for 1.5 s
    async with gptme.witness(cid) as witness:
        await gptme.step(cid, sid)
        await gptme.poller.wait(cid, "failed", witness)
        await asyncio.sleep(1.6)
        assert await gptme.step(cid, sid) == 200
        state = await gptme.poller.wait(cid, "completed", witness)
    assert (state["generating"], state["last_error"]) == (False, None)


@pytest.mark.parametrize("action", ["confirm", "skip"])
async def test_a_tool_waits_for_a_human_then_confirm_or_skip_ends_the_step(
    gptme: Gptme, action: str
) -> None:
    cid, sid = await gptme.create("tool")
    async with gptme.witness(cid) as witness:
        assert await gptme.step(cid, sid) == 200
        pending = await witness.wait_for("tool_pending")
        state = await gptme.poller.wait(cid, "awaiting_tool", witness)
        assert state["generating"] is False
        assert [t["tool_id"] for t in state["pending_tools"]] == [pending["tool_id"]]
        body = {"session_id": sid, "tool_id": pending["tool_id"], "action": action}
        status, _ = await gptme.post(cid, "/tool/confirm", body)
        assert status == 200
        # Both lead to a new generation (the model reads the output, or the
        # note that the tool was skipped); no event names a skipped tool.
        state = await gptme.poller.wait(
            cid,
            lambda s: (
                s["status"] == "completed"
                and witness.when("generation_started") is not None
                and len([t for t in witness.types() if t == "generation_complete"]) >= 2
            ),
            witness,
        )
    assert state["pending_tools"] == [] and state["generating"] is False


async def test_an_auto_confirmed_tool_never_awaits_a_human(gptme: Gptme) -> None:
    cid, sid = await gptme.create("slowtool")
    async with gptme.witness(cid) as witness:
        assert await gptme.step(cid, sid, auto_confirm=True) == 200
        running = await gptme.poller.wait(cid, "running_tool", witness)
        assert running["generating"] is True
        await gptme.poller.wait(
            cid,
            lambda s: (
                s["status"] == "completed" and witness.types().count("generation_complete") >= 2
            ),
            witness,
        )
        pending = await witness.wait_for("tool_pending")
    assert pending["auto_confirm"] is True  # gptme still sends tool_pending
    assert "awaiting_tool" not in gptme.poller.seen
    if gptme.modern:
        # 0.35.1 ends each step with step_complete: "completed" is shown only
        # when the whole step is over, never between the answer and the tool.
        assert gptme.poller.seen.count("completed") == 1, gptme.poller.seen


async def test_twenty_conversations_at_once_half_failing(gptme: Gptme) -> None:
    created = [await gptme.create("401" if i % 2 else "ok") for i in range(20)]
    for cid, _ in created:
        await gptme.live(cid)
    await asyncio.gather(*(gptme.step(cid, sid) for cid, sid in created))
    for i, (cid, _) in enumerate(created):
        state = await gptme.poller.wait(cid, "failed" if i % 2 else "completed", timeout=30)
        assert bool(state["last_error"]) == bool(i % 2)


async def test_work_started_directly_at_the_upstream_is_seen(gptme: Gptme) -> None:
    cid, sid = await gptme.create("401")
    await gptme.live(cid)
    async with gptme.witness(cid) as witness:
        await gptme.step(cid, sid, direct=True)  # not through the sidecar
        state = await gptme.poller.wait(cid, "failed", witness)
    assert "Incorrect API key" in state["last_error"]


async def test_upstream_killed_mid_step_and_restarted_ends_failed(gptme: Gptme) -> None:
    cid, sid = await gptme.create("slow")
    assert await gptme.step(cid, sid) == 200
    await gptme.poller.wait(cid, "generating")
    gptme.upstream.kill()
    # GETs answer 502 now; the state API still shows what the sidecar knows.
    await asyncio.sleep(0.2)
    snap = gptme.sidecar.snapshot(cid)
    assert (snap.generating, snap.stream) == (True, "reconnecting")  # it may still run
    gptme.upstream.start()  # same port; the generation is gone with the process
    state = await gptme.poller.wait(cid, "failed", timeout=30)
    assert "no sign of the step" in state["last_error"]
    assert state["stream"] == "live"


async def test_other_requests_and_the_stream_pass_through_unchanged(gptme: Gptme) -> None:
    http, headers = gptme.http, gptme.headers
    for path in ("/api/v2", "/api/v2/conversations?limit=3"):
        direct = await http.get(gptme.upstream.url + path, headers=headers)
        via = await http.get(gptme.sidecar.url + path, headers=headers)
        assert (via.status, await via.read()) == (direct.status, await direct.read())
    cid, sid = await gptme.create("ok")
    direct_body = await (await http.get(gptme.conversation_url(cid, True), headers=headers)).json()
    via_body = await gptme.poller.body(cid)
    sidecar_state = via_body.pop("session")
    direct_body.pop("session", None)
    assert via_body == direct_body  # the upstream's body, with the snapshot added
    assert sidecar_state["stream"] in ("connecting", "live")
    # The stream through the sidecar carries what the upstream sends.
    through = Witness(http, gptme.conversation_url(cid) + "/events", headers)
    async with gptme.witness(cid) as witness, through:
        await gptme.step(cid, sid)
        await witness.wait_for("generation_complete")
        await through.wait_for("generation_complete")
        await asyncio.sleep(0.3)
    work = lambda types: [t for t in types if t not in ("ping", "connected")]  # noqa: E731
    assert work(through.types()) == work(witness.types())


async def test_a_long_poll_never_waits_on_content_it_has_not_seen(gptme: Gptme) -> None:
    cid = f"seeded-{next(_ids)}-{int(time.time() * 1000) % 100000}"
    gptme.upstream.seed_gptme_conversation(cid, [{"role": "user", "content": "hello"}])
    await gptme.live(cid)
    url = gptme.conversation_url(cid)
    async with gptme.http.get(url, headers=gptme.headers) as resp:
        tag = resp.headers["ETag"]
    conv = gptme.sidecar.registry.get(cid)
    epoch = conv.epoch
    # A message appended straight at the upstream: the snapshot does not
    # change, the body does (0.31.0 sends no ETag of its own).
    status, _ = await gptme.post(cid, "", {"role": "user", "content": "more"}, direct=True)
    assert status == 200
    await eventually(lambda: conv.epoch != epoch, timeout=10)  # its event came
    started = time.monotonic()
    headers = {**gptme.headers, "If-None-Match": tag, "Prefer": "wait=20"}
    async with gptme.http.get(url, headers=headers) as resp:
        assert resp.status == 200
        body = await resp.json()
        assert resp.headers["ETag"] != tag
    assert body["log"][-1]["content"] == "more"
    assert time.monotonic() - started < 10  # answered, not held for the 20 s


async def test_a_model_server_error_fails_0_31_0_and_keeps_0_35_1_working(gptme: Gptme) -> None:
    cid, sid = await gptme.create("500")  # the model answers 500, every time
    async with gptme.witness(cid) as witness:
        started = time.monotonic()
        await gptme.step(cid, sid)
        if gptme.modern:
            # 0.35.1 retries a 5xx for a long time before any error event:
            # the work goes on, and the sidecar says so.
            await asyncio.sleep(4)
            state = await gptme.poller.state(cid)
            assert (state["status"], state["generating"]) == ("generating", True), witness.text()
            assert "error" not in witness.types()
            await gptme.post(cid, "/interrupt", {"session_id": sid})
            await gptme.poller.wait(cid, "interrupted", witness)
        else:
            # 0.31.0's OpenAI client retries twice, then the step fails.
            state = await gptme.poller.wait(cid, "failed", witness)
            assert "Error code: 500" in state["last_error"]
            assert time.monotonic() - started > 1.0  # after the client's retries


CHROMIUM_ACCEPT = "gzip, deflate, br, zstd"  # what every current browser asks for


async def test_a_browser_gets_the_merged_state_whatever_coding_it_accepts(gptme: Gptme) -> None:
    cid = f"conf-coding-{next(_ids)}-{int(time.time() * 1000) % 100000}"
    messages = [{"role": "user", "content": f"message {i} " + "x" * 200} for i in range(10)]
    gptme.upstream.seed_gptme_conversation(cid, messages)
    await gptme.live(cid)
    headers = {**gptme.headers, "Accept-Encoding": CHROMIUM_ACCEPT + ", dcz"}
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(gptme.conversation_url(cid, direct=True), headers=headers) as direct:
            assert direct.status == 200
            own = direct.headers.get("Content-Encoding")
        async with raw.get(gptme.conversation_url(cid), headers=headers) as resp:
            assert resp.status == 200
            coding = resp.headers.get("Content-Encoding")
            body = codings.decode_body(await resp.read(), coding or "", 10**7)
    # 0.35.1 (Flask-Compress) answers a browser in zstd; 0.31.0 compresses nothing.
    assert own == ("zstd" if gptme.modern else None)
    assert coding == own
    doc = orjson.loads(body)
    assert doc["session"]["stream"] == "live", doc.get("session")
    assert doc["log"][-1]["content"].startswith("message 9")
