"""Lists carry state: each observed item with its snapshot, the others as they came."""

from __future__ import annotations

import gzip

import aiohttp
import brotli
import orjson
import pytest

from sidecar.demo.fake import FakeOpencode, Outcome

from ..conftest import eventually

LIST = "/api/v2/conversations"


async def listed(g, query: str = "", **kwargs) -> tuple[aiohttp.ClientResponse, object]:
    async with g.http.get(g.url(LIST + query), headers=g.headers, **kwargs) as resp:
        return resp, await resp.json()


def by_id(items: list[dict]) -> dict[str, dict]:
    return {item["id"]: item for item in items}


@pytest.mark.parametrize("version", ["0.31.0", "0.35.1"])
async def test_observed_items_carry_the_snapshot_of_their_own_get_others_are_untouched(
    gptme, version: str
) -> None:
    g = await gptme(version, outcome=Outcome(kind="error"))
    sid = await g.create("seen")  # through the sidecar: observed
    await g.create("unseen", direct=True)  # at the upstream alone
    await g.step("seen", sid)
    single = await g.wait_status("seen", "failed")
    async with g.http.get(g.url(LIST, direct=True), headers=g.headers) as resp:
        direct = by_id(await resp.json())
    resp, items = await listed(g)
    assert resp.status == 200
    assert resp.headers["Sidecar-Enriched"] == "1"
    got = by_id(items)
    merged = got["seen"]["session"]
    assert list(merged) == list(single)  # the same key, the same shape
    # (0.35.1's own GET has a session object whose id stays; its list items
    # have none, so the id is the sidecar's, as in 0.31.0's GET.)
    own = "id" if version == "0.35.1" else None
    assert {k: v for k, v in merged.items() if k != own} == {
        k: v for k, v in single.items() if k != own
    }
    assert merged["last_error"]
    assert got["unseen"] == direct["unseen"]  # nothing invented
    assert {k: v for k, v in got["seen"].items() if k != "session"} == direct["seen"]


async def test_the_paginated_list_of_0_35_1_is_enriched_in_place(gptme) -> None:
    g = await gptme("0.35.1")
    for cid in ("a", "b", "c"):
        await g.create(cid)
    resp, page = await listed(g, "?paginated=1&limit=2")
    assert set(page) == {"conversations", "next_cursor"}
    assert page["next_cursor"]  # the upstream's own keys stay
    assert resp.headers["Sidecar-Enriched"] == "2"
    assert [item["session"]["status"] for item in page["conversations"]] == ["unknown"] * 2


async def test_an_unauthorised_list_is_relayed_as_it_came_and_observes_nothing(gptme) -> None:
    g = await gptme("0.35.1", token="s3cret")
    g.headers = {"Authorization": "Bearer s3cret"}
    await g.create("mine", direct=True)
    async with g.http.get(g.url(LIST)) as resp:  # no token
        assert resp.status == 401
        assert "Sidecar-Enriched" not in resp.headers
    assert g.sidecar.registry.get("mine") is None


async def test_listing_observes_the_newest_items_only_for_a_client_with_credentials(
    gptme,
) -> None:
    g = await gptme("0.35.1", token="s3cret", sidecar_options={"list_observe": 2})
    g.headers = {"Authorization": "Bearer s3cret"}
    for cid in ("oldest", "middle", "newest"):
        await g.create(cid, direct=True)
    resp, items = await listed(g)
    assert resp.headers["Sidecar-Enriched"] == "0"  # nothing was observed before it
    await eventually(lambda: g.fake.subscriber_count("newest") == 1)
    await eventually(lambda: g.fake.subscriber_count("middle") == 1)
    assert g.fake.subscriber_count("oldest") == 0
    resp, items = await listed(g)
    assert resp.headers["Sidecar-Enriched"] == "2"
    assert "session" not in by_id(items)["oldest"]
    # Listed, not read: the list does not let this client be held or served
    # from the cache for the conversation itself.
    conv = g.sidecar.registry.get("newest")
    assert conv is not None and not conv.authorised


async def test_a_list_without_credentials_starts_no_stream(gptme) -> None:
    g = await gptme("0.31.0")  # no auth at all: anyone who reaches the port
    await g.create("c1", direct=True)
    resp, _ = await listed(g)
    assert resp.headers["Sidecar-Enriched"] == "0"
    assert g.sidecar.registry.get("c1") is None
    assert g.fake.subscriber_count("c1") == 0


async def test_an_enriched_list_has_a_tag_of_its_own_and_a_304_only_when_nothing_changed(
    gptme,
) -> None:
    g = await gptme("0.35.1", outcome=Outcome(kind="error"))
    await g.create("quiet", direct=True)
    resp, _ = await listed(g)
    upstream_tag = resp.headers["ETag"]  # nothing enriched: the upstream's own
    async with g.http.get(g.url(LIST, direct=True)) as direct:
        assert direct.headers["ETag"] == upstream_tag
    sid = await g.create("busy")
    resp, _ = await listed(g)
    tag = resp.headers["ETag"]
    assert tag.startswith('W/"sc-') and tag != upstream_tag
    async with g.http.get(g.url(LIST), headers={"If-None-Match": tag}) as same:
        assert same.status == 304
        assert same.headers["ETag"] == tag
    await g.step("busy", sid)
    await g.wait_status("busy", "failed")
    # The upstream's list did not change (its tag covers its own items): the
    # state did, so the client gets it.
    async with g.http.get(g.url(LIST), headers={"If-None-Match": tag}) as changed:
        assert changed.status == 200
        assert by_id(await changed.json())["busy"]["session"]["status"] == "failed"


@pytest.mark.parametrize("coding", ["br", "gzip"])
async def test_a_compressed_list_is_merged_and_compressed_again(gptme, coding: str) -> None:
    g = await gptme("0.35.1")
    await g.create("c1")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(g.url(LIST), headers={"Accept-Encoding": coding}) as resp:
            assert resp.headers["Content-Encoding"] == coding
            body = await resp.read()
            assert int(resp.headers["Content-Length"]) == len(body)
            assert resp.headers["Sidecar-Enriched"] == "1"
    plain = brotli.decompress(body) if coding == "br" else gzip.decompress(body)
    assert orjson.loads(plain)[0]["session"]["status"] == "unknown"


async def test_a_list_beyond_merge_limit_passes_unchanged_and_says_nothing(gptme) -> None:
    g = await gptme("0.31.0", sidecar_options={"merge_limit": 64})
    await g.create("c1")
    await g.create("c2")
    resp, items = await listed(g)
    assert resp.status == 200
    assert "Sidecar-Enriched" not in resp.headers
    assert all("session" not in item for item in items)
    assert g.sidecar.server.app[_proxy_key()].counts.lists["too_large"] == 1


async def test_a_list_too_many_answers_would_hold_is_refused_plainly(gptme) -> None:
    g = await gptme("0.31.0", sidecar_options={"max_merge_memory": 16, "merge_limit": 1024})
    await g.create("c1")
    async with g.http.get(g.url(LIST)) as resp:
        assert resp.status == 503
        assert "max_merge_memory" in (await resp.json())["error"]


async def test_items_whose_ids_the_profile_refuses_are_never_looked_up(gptme) -> None:
    g = await gptme("0.31.0")
    await g.create("ok")
    g.fake.conversations["ok"].id = "../ok"  # the upstream lists a path, not an id
    resp, items = await listed(g)
    assert resp.headers["Sidecar-Enriched"] == "0"
    assert items[0]["id"] == "../ok" and "session" not in items[0]


@pytest.mark.parametrize("front_door", [True, False])
async def test_both_servers_answer_the_list_alike(gptme, front_door: bool) -> None:
    g = await gptme("0.31.0", sidecar_options={"front_door": front_door})
    await g.create("c1")
    resp, items = await listed(g)
    assert resp.headers["Sidecar-Enriched"] == "1"
    assert items[0]["session"]["status"] == "unknown"


async def test_the_opencode_list_carries_each_sessions_state(serve, start_sidecar, http) -> None:
    fake = FakeOpencode(outcome=Outcome(kind="error"))
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    sc = await start_sidecar(upstream, profile="opencode")
    async with http.post(sc.url + "/session", json={}) as resp:
        sid = (await resp.json())["id"]
    async with http.post(upstream + "/session", json={}) as resp:
        other = (await resp.json())["id"]  # created behind the sidecar's back
    async with http.post(f"{sc.url}/session/{sid}/prompt_async", json={}) as resp:
        assert resp.status == 204
    await eventually(lambda: sc.snapshot(sid).status == "failed")
    async with http.get(f"{sc.url}/session/{sid}") as resp:
        single = (await resp.json())["sidecar"]
    async with http.get(sc.url + "/session") as resp:
        items = by_id(await resp.json())
        enriched = int(resp.headers["Sidecar-Enriched"])
    assert items[sid]["sidecar"] == single
    # The shared stream carries every session's events: the one created
    # behind its back is observed too once it has had any.
    assert enriched == (2 if sc.registry.get(other) is not None else 1)


def _proxy_key():
    from sidecar.app import PROXY

    return PROXY
