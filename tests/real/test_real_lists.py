"""Conformance: lists carry state, in front of gptme 0.31.0, 0.35.1 and opencode 1.18.33.

What the released servers answer (checked against the fakes in
``test_fakes_match_real.py``): gptme 0.31.0 an array, newest first, with no
tag, ``paginated`` ignored; 0.35.1 an array tagged with a weak ETag (``304``
to it), or with ``paginated=1`` an object ``{conversations, next_cursor}``;
opencode an array of sessions, ``time.updated`` in epoch milliseconds.
Every merged item read here is validated against the published schema.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from ..conftest import eventually
from . import servers
from .harness import Witness, check_merged
from .test_real_gptme import Gptme, gptme
from .test_real_opencode import Opencode, opencode

__all__ = ["gptme", "opencode"]  # the fixtures, shared with those modules

pytestmark = pytest.mark.flaky(reruns=2, only_rerun=servers.UPSTREAM_FAULTS)

LIST = "/api/v2/conversations"


async def get_list(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], key: str
) -> tuple[int, list[dict[str, Any]], Any]:
    """The items of a list answer (each merged one checked against the
    schema), its Sidecar-Enriched count, and the whole document."""
    for _ in range(100):
        async with http.get(url, headers=headers) as resp:
            text = await resp.text()
            if resp.status >= 500 and "<!doctype html>" in text.lower():
                await asyncio.sleep(0.05)  # gptme 0.31.0's own HTML 500, now and then
                continue
            assert resp.status == 200, f"{url}: {resp.status} {text[:300]}"
            doc = await resp.json()
            enriched = int(resp.headers["Sidecar-Enriched"])
            break
    items = doc if isinstance(doc, list) else doc["conversations"]
    merged = [item for item in items if key in item]
    for item in merged:
        check_merged(item[key])
    assert enriched == len(merged), f"Sidecar-Enriched: {enriched}, {len(merged)} merged"
    return enriched, items, doc


def by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in items}


@pytest.mark.parametrize("version", servers.GPTME_VERSIONS)
@pytest.mark.parametrize("query", ["", "?paginated=1"])
async def test_a_gptme_list_carries_each_observed_conversations_state(
    gptme: Gptme, query: str
) -> None:
    failed, sid = await gptme.create("401")
    untouched, _ = await gptme.create("ok", direct=True)
    async with gptme.witness(failed) as witness:
        await gptme.step(failed, sid)
        single = await gptme.poller.wait(failed, "failed", witness)
    base = gptme.sidecar.url + LIST + query
    _, items, doc = await get_list(gptme.http, base, gptme.headers, "session")
    if query and gptme.modern:
        assert set(doc) == {"conversations", "next_cursor"}
    else:
        assert isinstance(doc, list)  # 0.31.0 ignores paginated
    got = by_id(items)
    merged = got[failed]["session"]
    assert (merged["status"], merged["last_error"]) == ("failed", single["last_error"])
    assert set(merged) == set(single)  # the same shape (key order is the upstream's)
    async with gptme.http.get(gptme.upstream.url + LIST + query, headers=gptme.headers) as resp:
        direct = await resp.json()
    direct_items = by_id(direct if isinstance(direct, list) else direct["conversations"])
    assert got[untouched] == direct_items[untouched]  # never observed: as it came
    assert {k: v for k, v in got[failed].items() if k != "session"} == direct_items[failed]


@pytest.mark.parametrize("version", ["0.35.1"])
async def test_a_gptme_0_35_1_list_without_its_token_is_refused_and_observes_nothing(
    gptme: Gptme,
) -> None:
    async with gptme.http.get(gptme.sidecar.url + LIST) as resp:
        assert resp.status == 401
        assert "Sidecar-Enriched" not in resp.headers
    assert gptme.sidecar.registry.conversations() == []


@pytest.mark.parametrize("version", ["0.35.1"])
async def test_listing_observes_new_work_started_elsewhere_on_gptme_0_35_1(
    gptme: Gptme,
) -> None:
    """A dashboard that only lists: the newest conversations are observed by
    the list itself, so work started directly at the upstream shows there."""
    cid, sid = await gptme.create("401", direct=True)
    _, items, _ = await get_list(gptme.http, gptme.sidecar.url + LIST, gptme.headers, "session")
    assert "session" not in by_id(items)[cid]  # not observed before this list
    await eventually(lambda: gptme.sidecar.snapshot(cid) is not None, timeout=5)
    await eventually(lambda: gptme.sidecar.snapshot(cid).stream == "live", timeout=10)
    async with Witness(gptme.http, gptme.conversation_url(cid, True) + "/events", gptme.headers):
        await gptme.step(cid, sid, direct=True)
        for _ in range(200):
            _, items, _ = await get_list(
                gptme.http, gptme.sidecar.url + LIST, gptme.headers, "session"
            )
            state = by_id(items)[cid].get("session") or {}
            if state.get("status") == "failed":
                break
            await asyncio.sleep(0.05)
    assert state["status"] == "failed" and "Incorrect API key" in state["last_error"]


@pytest.mark.parametrize("version", ["0.31.0"])
async def test_a_gptme_0_31_0_list_starts_no_stream_for_a_client_without_credentials(
    gptme: Gptme,
) -> None:
    cid, _ = await gptme.create("ok", direct=True)
    await get_list(gptme.http, gptme.sidecar.url + LIST, gptme.headers, "session")
    await asyncio.sleep(0.3)
    assert gptme.sidecar.registry.get(cid) is None


async def test_the_opencode_list_carries_each_observed_sessions_state(
    opencode: Opencode,
) -> None:
    sid = await opencode.create()
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "401")
        single = await opencode.poller.wait(sid, "failed", witness)
        await witness.wait_for("session.idle")
    enriched, items, doc = await get_list(
        opencode.http, opencode.sidecar.url + "/session", {}, "sidecar"
    )
    assert isinstance(doc, list) and enriched >= 1
    merged = by_id(items)[sid]["sidecar"]
    assert (merged["status"], merged["id"]) == ("failed", sid)
    assert merged["last_error"] == single["last_error"]
    async with opencode.http.get(opencode.upstream.url + "/session") as resp:
        direct = by_id(await resp.json())
    for item in items:
        if "sidecar" not in item:
            assert item == direct[item["id"]]  # never observed: as it came
