"""The event-validated response cache (``cache = "events"``), against the fake
gptme upstream: what it saves the upstream, and that no poll is ever answered
with a body the sidecar knows to be old. The same guarantees are checked
against the released servers in ``tests/test_real_cache.py``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from sidecar.demo.fake import FakeGptme, Outcome

from ..conftest import eventually

CACHE = {"cache": "events", "admin_token": "adm"}
ADMIN = {"Authorization": "Bearer adm"}
#: An expired entry is asked for while the poller waits (no stale-while-revalidate).
NO_STALE = {"cache_stale_while_revalidate": 0}


def upstream_gets(g: Any, cid: str) -> int:
    return g.fake.requests.count(("GET", f"/api/v2/conversations/{cid}"))


async def fetch(g: Any, cid: str, **headers: str) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    """A poll, on the poller's connections (the front door's)."""
    async with g.poller.get(
        g.url(f"/api/v2/conversations/{cid}"), headers={**g.headers, **headers}
    ) as resp:
        assert resp.status in (200, 304), await resp.text()
        return resp, (await resp.json() if resp.status == 200 else {})


async def announce(g: Any, cid: str, content: str) -> None:
    """A message appended through the sidecar (a write: the body's version moves)."""
    async with g.http.post(
        g.url(f"/api/v2/conversations/{cid}"),
        json={"role": "user", "content": content},
        headers=g.headers,
    ) as posted:
        assert posted.status == 200, await posted.text()


async def cached(g: Any, cid: str) -> None:
    """Read until the stream is live and an answer is stored."""
    await g.get(cid)
    await eventually(lambda: g.sidecar.snapshot(cid).stream == "live")
    resp, _ = await fetch(g, cid)
    assert "stored" in resp.headers["Cache-Status"], resp.headers["Cache-Status"]


async def test_off_by_default_every_poll_reaches_the_upstream(gptme) -> None:
    g = await gptme()
    await g.create("c1")
    await g.get("c1")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    before = upstream_gets(g, "c1")
    for _ in range(5):
        resp, _ = await fetch(g, "c1")
        assert "Cache-Status" not in resp.headers
    assert upstream_gets(g, "c1") == before + 5


async def test_polls_are_answered_from_the_cache_while_nothing_changes(gptme) -> None:
    g = await gptme(sidecar_options=CACHE)
    await g.create("c1")
    await cached(g, "c1")
    before = upstream_gets(g, "c1")
    # A change the upstream announces nowhere (no event) is not seen: the
    # polls are really answered by the sidecar.
    g.fake.conversations["c1"].log.append({"role": "user", "content": "unannounced"})
    for _ in range(20):
        resp, body = await fetch(g, "c1")
        assert resp.headers["Cache-Status"].startswith("sidecar; hit")
        assert int(resp.headers["Age"]) >= 0
        assert body["session"]["stream"] == "live"
        assert [m["content"] for m in body["log"]] == ["hello"]
    assert upstream_gets(g, "c1") == before


async def test_an_answer_older_than_cache_max_age_is_asked_again(gptme) -> None:
    g = await gptme(sidecar_options={**CACHE, **NO_STALE, "cache_max_age": 0.3})
    await g.create("c1")
    await cached(g, "c1")
    g.fake.conversations["c1"].log.append({"role": "user", "content": "unannounced"})
    await asyncio.sleep(0.35)
    resp, body = await fetch(g, "c1")
    assert "detail=expired" in resp.headers["Cache-Status"]
    assert body["log"][-1]["content"] == "unannounced"


async def test_the_merged_state_is_current_on_a_hit(gptme) -> None:
    g = await gptme(sidecar_options=CACHE, outcome=Outcome(kind="error", start_delay=0.3))
    sid = await g.create("c1")
    await cached(g, "c1")
    await g.step("c1", sid)
    # The step's request was a write: the next poll asks the upstream...
    resp, body = await fetch(g, "c1")
    assert "detail=content" in resp.headers["Cache-Status"]
    assert body["session"]["status"] in ("starting", "generating")
    # ...and the error (an event that changes the state, not the body) shows
    # on answers from the cache at once.
    await eventually(lambda: g.sidecar.snapshot("c1").status == "failed")
    resp, body = await fetch(g, "c1")
    assert resp.headers["Cache-Status"].startswith("sidecar; hit")
    assert body["session"]["status"] == "failed"
    assert body["session"]["last_error"]


async def test_a_content_event_makes_every_later_poll_carry_the_change(gptme, http) -> None:
    """The message is appended at the upstream directly, while 20 pollers
    poll through the sidecar: every poll sent once the sidecar has the
    event carries the message."""
    g = await gptme(sidecar_options=CACHE, get_delay=0.02)
    await g.create("c1")
    await cached(g, "c1")
    conv = g.sidecar.registry.get("c1")
    seen_at: list[float] = []
    polls: list[tuple[float, list[str]]] = []
    stop = asyncio.Event()

    async def poller() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            _, body = await fetch(g, "c1")
            polls.append((sent, [m["content"] for m in body["log"]]))
            await asyncio.sleep(0.005)

    async def watch(version: int) -> None:
        await eventually(lambda: conv.version != version, interval=0.001)
        seen_at.append(time.monotonic())

    tasks = [asyncio.create_task(poller()) for _ in range(20)]
    await asyncio.sleep(0.3)
    watcher = asyncio.create_task(watch(conv.version))
    async with http.post(
        g.url("/api/v2/conversations/c1", direct=True), json={"role": "user", "content": "new"}
    ) as resp:
        assert resp.status == 200
    await watcher
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*tasks)
    after = [log for sent, log in polls if sent > seen_at[0]]
    assert len(after) > 20
    assert all(log[-1] == "new" for log in after), [log[-1] for log in after]
    hits = sum(1 for sent, log in polls if sent > seen_at[0] + 0.1)
    assert hits and upstream_gets(g, "c1") < len(polls) / 3  # the cache served most


async def test_a_write_through_the_sidecar_is_read_back_at_once(gptme) -> None:
    g = await gptme(sidecar_options=CACHE)
    await g.create("c1")
    await cached(g, "c1")
    for i in range(10):
        async with g.http.post(
            g.url("/api/v2/conversations/c1"), json={"role": "user", "content": f"m{i}"}
        ) as resp:
            assert resp.status == 200
        _, body = await fetch(g, "c1")
        assert body["log"][-1]["content"] == f"m{i}"


async def test_a_write_invalidates_even_without_an_event(gptme) -> None:
    """Writes the upstream announces with no event still invalidate: the
    request itself is the sign (here: a path below the conversation's)."""
    g = await gptme(sidecar_options=CACHE)
    await g.create("c1")
    await cached(g, "c1")
    g.fake.conversations["c1"].log.append({"role": "user", "content": "unannounced"})
    async with g.http.patch(g.url("/api/v2/conversations/c1/messages/0"), json={}) as resp:
        assert resp.status in (404, 405)  # the fake has no such route: still a write
    resp, body = await fetch(g, "c1")
    assert "detail=content" in resp.headers["Cache-Status"]
    assert body["log"][-1]["content"] == "unannounced"


async def test_a_broken_stream_bypasses_the_cache_until_it_is_live_again(gptme) -> None:
    g = await gptme(sidecar_options={**CACHE, "reconnect_min": 0.3, "reconnect_max": 0.3})
    await g.create("c1")
    await cached(g, "c1")
    g.fake.drop_streams()
    await eventually(lambda: g.sidecar.snapshot("c1").stream != "live")
    before = upstream_gets(g, "c1")
    g.fake.conversations["c1"].log.append({"role": "user", "content": "while blind"})
    resp, body = await fetch(g, "c1")
    assert resp.headers["Cache-Status"] == "sidecar; fwd=bypass; detail=not_live"
    assert body["log"][-1]["content"] == "while blind"
    assert body["session"]["stream"] in ("reconnecting", "connecting")
    assert upstream_gets(g, "c1") == before + 1
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    resp, _ = await fetch(g, "c1")
    assert "stored" in resp.headers["Cache-Status"]  # asked again: events may have been lost
    resp, _ = await fetch(g, "c1")
    assert resp.headers["Cache-Status"].startswith("sidecar; hit")


async def test_no_cache_from_the_client_asks_the_upstream(gptme) -> None:
    g = await gptme(sidecar_options=CACHE)
    await g.create("c1")
    await cached(g, "c1")
    before = upstream_gets(g, "c1")
    resp, _ = await fetch(g, "c1", **{"Cache-Control": "no-cache"})
    assert resp.headers["Cache-Status"].startswith("sidecar; fwd=request; detail=no_cache")
    resp, _ = await fetch(g, "c1", Pragma="no-cache")
    assert upstream_gets(g, "c1") == before + 2


async def test_concurrent_misses_ask_the_upstream_once(gptme) -> None:
    g = await gptme(sidecar_options={**CACHE, **NO_STALE, "cache_max_age": 0.2}, get_delay=0.1)
    await g.create("c1")
    await cached(g, "c1")
    await asyncio.sleep(0.25)
    before = upstream_gets(g, "c1")
    answers = await asyncio.gather(*(fetch(g, "c1") for _ in range(20)))
    assert upstream_gets(g, "c1") == before + 1
    statuses = [resp.headers["Cache-Status"] for resp, _ in answers]
    assert sum("detail=collapsed" in s for s in statuses) == 19, statuses


async def test_credentials_are_cached_apart_and_a_refused_client_gets_nothing(gptme) -> None:
    g = await gptme("0.35.1", token="s3cret", sidecar_options=CACHE)
    g.headers = {"Authorization": "Bearer s3cret"}
    await g.create("c1")
    await cached(g, "c1")
    resp, _ = await fetch(g, "c1")
    assert resp.headers["Cache-Status"].startswith("sidecar; hit")
    async with g.http.get(
        g.url("/api/v2/conversations/c1"), headers={"Authorization": "Bearer wrong"}
    ) as denied:
        assert denied.status == 401
    async with g.http.get(g.url("/api/v2/conversations/c1")) as anonymous:
        assert anonymous.status == 401


async def test_an_expired_answer_is_revalidated_with_the_upstreams_etag(gptme) -> None:
    g = await gptme("0.35.1", sidecar_options={**CACHE, **NO_STALE, "cache_max_age": 0.2})
    await g.create("c1")
    await cached(g, "c1")
    await asyncio.sleep(0.25)
    resp, body = await fetch(g, "c1")
    assert "detail=expired" in resp.headers["Cache-Status"]
    assert body["log"][0]["content"] == "hello"
    async with g.http.get(g.url("/_sidecar/metrics"), headers=ADMIN) as metrics:
        text = await metrics.text()
    # The conditional request was the sidecar's (the upstream answered 304 to
    # the entry's tag); the client, which sent none, got the body.
    assert 'sidecar_cache_requests_total{reason="not_modified",result="revalidated"} 1.0' in text
    assert g.fake.requests.count(("GET", "/api/v2/conversations/c1")) >= 3


async def test_a_client_holding_the_current_answer_gets_a_304_from_the_cache(gptme) -> None:
    g = await gptme(sidecar_options=CACHE)
    await g.create("c1")
    await cached(g, "c1")
    resp, _ = await fetch(g, "c1")
    etag = resp.headers["ETag"]
    before = upstream_gets(g, "c1")
    again, _ = await fetch(g, "c1", **{"If-None-Match": etag})
    assert again.status == 304
    assert again.headers["ETag"] == etag
    assert upstream_gets(g, "c1") == before


async def test_a_long_poll_wakes_on_a_content_event_with_the_new_body(gptme, http) -> None:
    g = await gptme(sidecar_options=CACHE)
    await g.create("c1")
    await cached(g, "c1")
    resp, _ = await fetch(g, "c1")
    etag = resp.headers["ETag"]
    held = asyncio.create_task(fetch(g, "c1", **{"If-None-Match": etag, "Prefer": "wait=5"}))
    await asyncio.sleep(0.2)
    assert not held.done()
    async with http.post(
        g.url("/api/v2/conversations/c1", direct=True), json={"role": "user", "content": "new"}
    ) as posted:
        assert posted.status == 200
    resp, body = await asyncio.wait_for(held, 3)
    assert resp.status == 200
    assert body["log"][-1]["content"] == "new"


async def test_memory_is_bounded_least_recently_used_out(gptme) -> None:
    # Room for two entries (about 2.3 KB each, their keys and overhead counted).
    g = await gptme(sidecar_options={**CACHE, "cache_max_bytes": 5000})
    for cid in ("c1", "c2", "c3"):
        await g.create(cid)
        await cached(g, cid)
    async with g.http.get(g.url("/_sidecar/metrics"), headers=ADMIN) as metrics:
        text = await metrics.text()
    held = float(text.split("\nsidecar_cache_bytes ")[1].split()[0])
    entries = float(text.split("\nsidecar_cache_entries ")[1].split()[0])
    assert 0 < held <= 5000
    assert entries < 3, held
    resp, _ = await fetch(g, "c1")  # the oldest went first
    assert "detail=absent" in resp.headers["Cache-Status"]


@pytest.mark.parametrize("header", ["Set-Cookie", "Vary"])
async def test_an_answer_the_upstream_marks_personal_is_not_kept(
    serve, start_sidecar, http, header: str
) -> None:
    fake = FakeGptme()

    @aiohttp.web.middleware
    async def personal(request: Any, handler: Any) -> Any:
        resp = await handler(request)
        if request.method == "GET" and not request.path.endswith("/events"):
            resp.headers[header] = "a=b" if header == "Set-Cookie" else "*"
        return resp

    fake.app.middlewares.append(personal)
    server = await serve(fake.app)
    sidecar = await start_sidecar(str(server.make_url("")).rstrip("/"), cache="events")
    url = f"{sidecar.url}/api/v2/conversations/c1"
    async with http.put(url, json={"prompt": "p", "messages": []}) as resp:
        assert resp.status == 200
    async with http.get(url) as resp:
        await resp.read()
    await eventually(lambda: sidecar.snapshot("c1").stream == "live")
    for _ in range(3):
        async with http.get(url) as resp:
            assert "stored" not in resp.headers["Cache-Status"]
            assert "hit" not in resp.headers["Cache-Status"]


# ------------------------------------------- stale-while-revalidate (RFC 5861)


async def cache_count(g: Any, result: str, reason: str) -> float:
    async with g.http.get(g.url("/_sidecar/metrics"), headers=ADMIN) as metrics:
        text = await metrics.text()
    line = f'sidecar_cache_requests_total{{reason="{reason}",result="{result}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


async def counted(
    g: Any, result: str, reason: str, timeout: float = 5.0, at_least: int = 1
) -> None:
    """Wait, bounded, until the cache has counted ``at_least`` of (result, reason)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await cache_count(g, result, reason) < at_least:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no {result}/{reason} counted within {timeout} s")
        await asyncio.sleep(0.02)


async def test_an_expired_answer_valid_by_the_events_is_served_at_once_and_asked_again_behind(
    gptme,
) -> None:
    g = await gptme(sidecar_options={**CACHE, "cache_max_age": 0.3}, get_delay=0.3)
    await g.create("c1")
    await cached(g, "c1")
    g.fake.conversations["c1"].log.append({"role": "user", "content": "unannounced"})
    await asyncio.sleep(0.35)
    before = upstream_gets(g, "c1")
    # Twenty pollers find it expired while the upstream takes 0.3 s a GET:
    # each is answered from the cache, none waits, and the upstream is asked once.
    answers = await asyncio.gather(*(fetch(g, "c1") for _ in range(20)))
    for resp, body in answers:
        status = resp.headers["Cache-Status"]
        assert status.startswith("sidecar; hit; ttl=-") and "stale-while-revalidate" in status
        assert [m["content"] for m in body["log"]] == ["hello"]
        assert body["session"]["stream"] == "live"
    assert await cache_count(g, "background", "refreshed") == 0  # still on its way
    assert await cache_count(g, "hit", "stale") == 20
    await eventually(lambda: upstream_gets(g, "c1") == before + 1)
    await counted(g, "background", "refreshed")
    # Refreshed behind the pollers' backs: the next poll is a fresh hit with
    # the change, and the upstream was asked once for all of them.
    resp, body = await fetch(g, "c1")
    assert resp.headers["Cache-Status"].startswith("sidecar; hit; ttl=")
    assert "stale-while-revalidate" not in resp.headers["Cache-Status"]
    assert body["log"][-1]["content"] == "unannounced"
    assert upstream_gets(g, "c1") == before + 1


async def test_a_background_revalidation_with_the_upstreams_tag_refreshes_the_entry(gptme) -> None:
    g = await gptme("0.35.1", sidecar_options={**CACHE, "cache_max_age": 0.2})
    await g.create("c1")
    await cached(g, "c1")
    await asyncio.sleep(0.25)
    resp, _ = await fetch(g, "c1")
    assert "stale-while-revalidate" in resp.headers["Cache-Status"]
    await counted(g, "background", "not_modified")
    # A 304 to the entry's own tag: fresh again, and no client was counted
    # as revalidated (the conditional request was the sidecar's alone).
    assert await cache_count(g, "revalidated", "not_modified") == 0
    resp, _ = await fetch(g, "c1")
    assert resp.headers["Cache-Status"].startswith("sidecar; hit; ttl=")
    assert "stale-while-revalidate" not in resp.headers["Cache-Status"]


async def test_entries_that_expire_together_are_revalidated_in_turns(gptme) -> None:
    """A cache's worth of entries stored at once expire at once: the upstream
    gets their revalidations ``cache_revalidations`` at a time, and every
    poller is answered at once meanwhile."""
    options = {**CACHE, "cache_max_age": 0.5, "cache_revalidations": 2}
    g = await gptme(sidecar_options=options)
    ids = [f"c{i}" for i in range(6)]
    for cid in ids:
        await g.create(cid)
        await cached(g, cid)
        g.fake.conversations[cid].log.append({"role": "user", "content": "unannounced"})
    await asyncio.sleep(0.55)
    g.fake.get_delay = 0.2
    answers = await asyncio.gather(*(fetch(g, cid) for cid in ids))
    for resp, _ in answers:
        assert "stale-while-revalidate" in resp.headers["Cache-Status"]
    await eventually(lambda: g.fake.most_gets_at_once == 2)
    await counted(g, "background", "refreshed", timeout=10, at_least=len(ids))
    assert g.fake.most_gets_at_once == 2
    for cid in ids:
        resp, body = await fetch(g, cid)
        assert "stale-while-revalidate" not in resp.headers["Cache-Status"]
        assert body["log"][-1]["content"] == "unannounced"


async def test_a_revalidation_overtaken_while_it_waits_its_turn_is_not_sent(gptme) -> None:
    options = {**CACHE, "cache_max_age": 0.3, "cache_revalidations": 1}
    g = await gptme(sidecar_options=options)
    for cid in ("c1", "c2"):
        await g.create(cid)
        await cached(g, cid)
    await asyncio.sleep(0.35)
    g.fake.get_delay = 0.3
    await fetch(g, "c1")  # its revalidation takes the one turn...
    await fetch(g, "c2")  # ...and c2's waits for it
    gets = upstream_gets(g, "c2")
    await announce(g, "c2", "announced")
    await counted(g, "background", "superseded")
    assert upstream_gets(g, "c2") == gets  # c2's stale answer was never asked for again
    resp, body = await fetch(g, "c2")
    assert "detail=content" in resp.headers["Cache-Status"]
    assert body["log"][-1]["content"] == "announced"


async def test_past_the_stale_bound_the_poller_waits_for_the_upstream(gptme) -> None:
    options = {**CACHE, "cache_max_age": 0.2, "cache_stale_while_revalidate": 0.2}
    g = await gptme(sidecar_options=options)
    await g.create("c1")
    await cached(g, "c1")
    g.fake.conversations["c1"].log.append({"role": "user", "content": "unannounced"})
    await asyncio.sleep(0.45)
    resp, body = await fetch(g, "c1")
    assert "detail=expired" in resp.headers["Cache-Status"]
    assert body["log"][-1]["content"] == "unannounced"


async def test_no_stale_answer_after_a_content_event_nor_for_a_younger_max_age(gptme) -> None:
    g = await gptme(sidecar_options={**CACHE, "cache_max_age": 0.2})
    await g.create("c1")
    await cached(g, "c1")
    await asyncio.sleep(0.25)
    # The client wants an answer no older than 0 s... (max-age=0 is no-cache)
    resp, _ = await fetch(g, "c1", **{"Cache-Control": "max-age=0"})
    assert "fwd=request" in resp.headers["Cache-Status"]
    await asyncio.sleep(0.25)
    # ...or a content event came: the events say the body changed, so a
    # stale answer is never served, however young.
    await announce(g, "c1", "announced")
    resp, body = await fetch(g, "c1")
    assert "detail=content" in resp.headers["Cache-Status"]
    assert body["log"][-1]["content"] == "announced"


async def test_a_background_revalidation_refused_by_the_upstream_serves_that_client_no_more(
    gptme,
) -> None:
    g = await gptme("0.35.1", token="s3cret", sidecar_options={**CACHE, "cache_max_age": 0.2})
    g.headers = {"Authorization": "Bearer s3cret"}
    await g.create("c1")
    await cached(g, "c1")
    await asyncio.sleep(0.25)
    g.fake.token = "rotated"  # the upstream no longer accepts it
    resp, _ = await fetch(g, "c1")
    assert "stale-while-revalidate" in resp.headers["Cache-Status"]
    await counted(g, "background", "not_stored")
    async with g.http.get(g.url("/api/v2/conversations/c1"), headers=g.headers) as refused:
        assert refused.status == 401


async def test_a_hit_says_what_is_true_now_however_often_its_head_is_reused(gptme) -> None:
    """A poller sends the same head each time, and a hit's head is rendered
    once per state and second: its ETag still follows the snapshot, its Age
    the clock, its body the state."""
    g = await gptme(sidecar_options=CACHE, outcome=Outcome(kind="error", start_delay=0.3))
    sid = await g.create("c1")
    await cached(g, "c1")
    first, body = await fetch(g, "c1")
    again, _ = await fetch(g, "c1")
    assert first.headers["Cache-Status"].startswith("sidecar; hit")
    assert again.headers["ETag"] == first.headers["ETag"]
    await g.step("c1", sid)
    await eventually(lambda: g.sidecar.snapshot("c1").status == "failed")
    for _ in range(20):  # (the step's write made the entry unusable: stored again)
        failed, body = await fetch(g, "c1")
        if failed.headers["Cache-Status"].startswith("sidecar; hit"):
            break
    else:
        raise AssertionError(failed.headers["Cache-Status"])
    assert body["session"]["status"] == "failed"
    assert failed.headers["ETag"] != first.headers["ETag"]
    age = int(failed.headers["Age"])
    await asyncio.sleep(1.05)
    later, body = await fetch(g, "c1")
    assert later.headers["Cache-Status"].startswith("sidecar; hit")
    assert int(later.headers["Age"]) >= age + 1
    assert later.headers["ETag"] == failed.headers["ETag"]
    assert body["session"]["status"] == "failed"


async def test_a_change_that_only_makes_served_tags_stale_gives_a_hit_a_new_etag(gptme) -> None:
    """A hit's head, and its tag, are kept between polls; a change of the
    conversation that leaves its body usable (the epoch moves, the body's
    version does not) still gives the next hit a new ETag, and the old one
    earns no 304 (gptme 0.31.0 tags no body: the epoch is in the tag)."""
    g = await gptme(sidecar_options=CACHE)
    await g.create("c1")
    await cached(g, "c1")
    first, _ = await fetch(g, "c1")
    again, _ = await fetch(g, "c1")
    assert again.headers["ETag"] == first.headers["ETag"]
    g.sidecar.registry.get("c1").changed()
    later, body = await fetch(g, "c1")
    assert later.headers["Cache-Status"].startswith("sidecar; hit")
    assert later.headers["ETag"] != first.headers["ETag"]
    assert [m["content"] for m in body["log"]] == ["hello"]
    old, _ = await fetch(g, "c1", **{"If-None-Match": first.headers["ETag"]})
    assert old.status == 200
    current, _ = await fetch(g, "c1", **{"If-None-Match": later.headers["ETag"]})
    assert current.status == 304
