"""Conformance: the response cache (``cache = "events"``) in front of the
released gptme servers (0.31.0, 0.35.1). Never stale: a message appended at
the upstream directly is in every poll the sidecar answers once it has the
event; a write through the sidecar is read back at once; an answer to a
finished step carries the step's message; while the stream is down, every
poll goes to the upstream."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from ..conftest import eventually
from . import servers
from .harness import Relay
from .test_real_gptme import Gptme

pytestmark = [
    pytest.mark.parametrize("version", servers.GPTME_VERSIONS),
    pytest.mark.flaky(reruns=2, only_rerun=servers.UPSTREAM_FAULTS),
]
_ids = itertools.count(1)
#: The 40-message conversation of the benchmark, about 64 KiB.
MESSAGES = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "x" * 1500}
    for i in range(40)
]


class Cached(Gptme):
    """The sidecar (cache on) reaches the upstream through a relay that can
    cut its event streams."""

    def __init__(self, upstream: servers.Process, sidecar: Any, http: Any, relay: Relay) -> None:
        super().__init__(upstream, sidecar, http)
        self.relay = relay


@pytest.fixture
async def gptme(
    version: str, request: pytest.FixtureRequest, start_sidecar: Any, http: aiohttp.ClientSession
) -> AsyncIterator[Cached]:
    upstream = request.getfixturevalue("real_gptme_" + version.replace(".", "_")).running()
    async with Relay(upstream.port) as relay:
        sidecar = await start_sidecar(relay.url, cache="events")
        yield Cached(upstream, sidecar, http, relay)


def seeded(gptme: Gptme) -> str:
    cid = f"cache-{next(_ids)}-{int(time.time() * 1000) % 100000}"
    gptme.upstream.seed_gptme_conversation(cid, MESSAGES)
    return cid


class GptmeFault(AssertionError):
    """gptme 0.31.0's own HTML 500 (concurrent GETs can cause it), relayed:
    its text is one ``servers.UPSTREAM_FAULTS`` reruns the scenario on."""


async def poll(gptme: Gptme, cid: str) -> tuple[str, list[str]]:
    """One poll through the sidecar: its Cache-Status and the log's contents
    (:class:`GptmeFault` for an upstream 5xx that is not the sidecar's own)."""
    url = gptme.conversation_url(cid)
    async with gptme.http.get(url, headers=gptme.headers) as resp:
        body = await resp.read()
        if servers.upstream_error(resp.status, body):
            raise GptmeFault(f"GET {url}: {resp.status} {body[:80].decode(errors='replace')}")
        assert resp.status == 200, body
        log = orjson.loads(body)["log"]
        return resp.headers.get("Cache-Status", ""), [m["content"] for m in log]


async def answered(gptme: Gptme, cid: str, tries: int = 100) -> tuple[str, list[str]]:
    """A poll through the sidecar that gptme did not fail itself: asked
    again 50 ms apart while it does, ``tries`` times at most (then its fault)."""
    for _ in range(tries - 1):
        try:
            return await poll(gptme, cid)
        except GptmeFault:
            await asyncio.sleep(0.05)
    return await poll(gptme, cid)


async def cached(gptme: Gptme, cid: str) -> None:
    await gptme.live(cid)
    for _ in range(20):
        answer = await answered(gptme, cid)
        if answer[0].startswith("sidecar; hit"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer came from the cache: {answer}")


async def test_a_message_appended_at_the_upstream_is_in_every_later_poll(gptme: Gptme) -> None:
    cid = seeded(gptme)
    await cached(gptme, cid)
    conv = gptme.sidecar.registry.get(cid)
    polls: list[tuple[float, str, list[str]]] = []
    stop = asyncio.Event()

    async def poller() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            with contextlib.suppress(GptmeFault):  # (judged on the polls gptme answered)
                polls.append((sent, *await poll(gptme, cid)))
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(poller()) for _ in range(10)]
    await asyncio.sleep(0.5)
    version = conv.version
    status, _ = await gptme.post(cid, "", {"role": "user", "content": "appended"}, direct=True)
    assert status == 200
    await eventually(lambda: conv.version != version, timeout=10, interval=0.001)
    seen = time.monotonic()  # the sidecar has the event (message_added) by now
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    before = [p for p in polls if p[0] < seen - 0.2]
    after = [p for p in polls if p[0] > seen]
    assert len(after) >= 20
    stale = [(status, log[-1][:20]) for _, status, log in after if log[-1] != "appended"]
    assert not stale, stale
    # The polls were answered from the cache, before and after the change.
    assert sum(status.startswith("sidecar; hit") for _, status, _ in before) > len(before) / 2
    assert sum(status.startswith("sidecar; hit") for _, status, _ in after) > len(after) / 2


async def test_a_write_through_the_sidecar_is_read_back_at_once(gptme: Gptme) -> None:
    cid = seeded(gptme)
    await cached(gptme, cid)
    status, _ = await gptme.post(cid, "", {"role": "user", "content": "mine"})
    assert status == 200
    answer = await answered(gptme, cid)
    assert answer[1][-1] == "mine", answer[0]


async def test_a_finished_step_is_read_with_its_answer(gptme: Gptme) -> None:
    cid, sid = await gptme.create("ok")
    await cached(gptme, cid)
    assert await gptme.step(cid, sid) == 200
    # Waited for in the sidecar, not by polling: gptme 0.31.0 often breaks a
    # conversation for good (its HTML 500 at every GET after) when a GET
    # comes while a step writes it.
    await eventually(
        lambda: gptme.sidecar.snapshot(cid).status in ("completed", "failed"), timeout=15
    )
    state = gptme.sidecar.snapshot(cid)
    # (A failure names its cause: gptme 0.31.0's workspace race is a rerun.)
    assert state.status == "completed", state.last_error
    # From the moment the state says completed, the answer is in the body.
    for _ in range(10):
        answer = await answered(gptme, cid)
        upstream_log = [m["content"] for m in (await gptme.direct(cid))["log"]]
        assert answer[1] == upstream_log, answer[0]
        await asyncio.sleep(0.05)


async def test_while_the_stream_is_down_every_poll_asks_the_upstream(gptme: Cached) -> None:
    cid = seeded(gptme)
    await cached(gptme, cid)
    conv = gptme.sidecar.registry.get(cid)
    relay = gptme.relay
    relay.blocked = True
    relay.cut()  # the stream's connection breaks, and no new one gets through
    await eventually(lambda: conv.snapshot.stream != "live")
    # The sidecar cannot see this message's event: it must not answer from
    # what it held.
    status, _ = await gptme.post(cid, "", {"role": "user", "content": "unseen"}, direct=True)
    assert status == 200
    answer = await answered(gptme, cid)
    assert answer[0] == "sidecar; fwd=bypass; detail=not_live"
    assert answer[1][-1] == "unseen"
    relay.blocked = False
    await eventually(lambda: conv.snapshot.stream == "live", timeout=10)
    await cached(gptme, cid)
    answer = await answered(gptme, cid)
    assert answer[1][-1] == "unseen"


async def test_an_expired_answer_is_revalidated_where_the_upstream_has_a_tag(
    gptme: Cached, start_sidecar: Any
) -> None:
    """0.35.1 tags its answers: an expired one is asked for with its tag, and
    the 304 refreshes it. 0.31.0 has no tag: the answer is asked for whole."""
    sidecar = await start_sidecar(
        gptme.upstream.url,
        cache="events",
        cache_max_age=0.3,
        cache_stale_while_revalidate=0,
        admin_token="adm",
    )
    short = Gptme(gptme.upstream, sidecar, gptme.http)
    cid = seeded(gptme)
    await cached(short, cid)
    await asyncio.sleep(0.35)
    answer = await answered(short, cid)
    assert "detail=expired" in answer[0]
    assert len(answer[1]) == len(MESSAGES)
    auth = {"Authorization": "Bearer adm"}
    async with gptme.http.get(sidecar.url + "/_sidecar/metrics", headers=auth) as resp:
        text = await resp.text()
    revalidated = 'sidecar_cache_requests_total{reason="not_modified",result="revalidated"} 1.0'
    assert (revalidated in text) is short.modern, text


async def test_an_expired_answer_is_served_at_once_and_refreshed_behind_the_poller(
    gptme: Cached, start_sidecar: Any
) -> None:
    """Past ``cache_max_age``, an answer still valid by the events is served
    at once (stale-while-revalidate) and asked for again in the background:
    0.35.1 confirms it with a 304 to its own tag, 0.31.0 sends it whole. A
    change gptme made without an event is seen once that refresh is in."""
    sidecar = await start_sidecar(
        gptme.upstream.url, cache="events", cache_max_age=0.3, admin_token="adm"
    )
    short = Gptme(gptme.upstream, sidecar, gptme.http)
    cid = seeded(gptme)
    await cached(short, cid)
    await asyncio.sleep(0.35)
    answer = await answered(short, cid)
    assert answer[0].startswith("sidecar; hit; ttl=-"), answer[0]
    assert "detail=stale-while-revalidate" in answer[0]
    assert len(answer[1]) == len(MESSAGES)
    reason = "not_modified" if short.modern else "refreshed"
    line = f'sidecar_cache_requests_total{{reason="{reason}",result="background"}} 1.0'
    auth = {"Authorization": "Bearer adm"}

    async def counted() -> bool:
        async with gptme.http.get(sidecar.url + "/_sidecar/metrics", headers=auth) as resp:
            return line in await resp.text()

    deadline = time.monotonic() + 10
    while not await counted():
        assert time.monotonic() < deadline, f"no {line} within 10 s"
        await asyncio.sleep(0.05)
    answer = await answered(short, cid)
    assert answer[0].startswith("sidecar; hit; ttl="), answer[0]
    assert "stale" not in answer[0]
