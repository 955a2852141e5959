"""Merged GETs: compression, conditional requests, auth and Host checks."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from sidecar.demo.fake import Outcome
from sidecar.http import codings

from ..conftest import eventually


@pytest.mark.parametrize("coding", ["br", "gzip", "zstd"])
async def test_a_compressed_upstream_body_is_merged_and_recompressed(gptme, coding: str) -> None:
    g = await gptme("0.35.1", outcome=Outcome(kind="error"))
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(
            g.url("/api/v2/conversations/c1"), headers={"Accept-Encoding": coding}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Encoding"] == coding
            assert resp.headers["Vary"] == "Accept-Encoding"
            body = await resp.read()
            assert int(resp.headers["Content-Length"]) == len(body)
    doc = json.loads(codings.decode_body(body, coding, 10**6))
    assert doc["session"]["status"] == "failed"
    assert doc["session"]["id"]  # the upstream's own key is kept
    assert doc["log"][0]["content"] == "hello"


BROWSER = "gzip, deflate, br, zstd, dcz"  # Chromium's, and a coding not decoded here


async def test_a_merged_answer_is_asked_for_only_in_codings_decoded_here(gptme) -> None:
    g = await gptme("0.35.1", outcome=Outcome(kind="error"))
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")
    g.fake.accept_encodings.clear()
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        for target in ("/api/v2/conversations/c1", "/api/v2/conversations"):
            async with raw.get(g.url(target), headers={"Accept-Encoding": BROWSER}) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Encoding"] == "zstd"
                doc = json.loads(codings.decode_body(await resp.read(), "zstd", 10**6))
            item = doc if target.endswith("c1") else doc[0]
            assert item["session"]["status"] == "failed", item
        # A forwarded request keeps the client's header as it came.
        async with raw.get(g.url("/api/v2"), headers={"Accept-Encoding": BROWSER}) as resp:
            assert resp.status == 200
    seen = dict(g.fake.accept_encodings)
    assert seen["/api/v2/conversations/c1"] == "gzip, deflate, br, zstd"
    assert seen["/api/v2/conversations"] == "gzip, deflate, br, zstd"
    assert seen["/api/v2"] == BROWSER


async def test_a_client_that_refuses_zstd_is_not_answered_in_it(gptme) -> None:
    g = await gptme("0.35.1", sidecar_options={"cache": "events"})
    await g.create("c1")
    await g.get("c1")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    url = g.url("/api/v2/conversations/c1")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        for accept, coding in [
            ("zstd, *;q=0.5", "zstd"),  # (twice: the second is the cache's)
            ("zstd, *;q=0.5", "zstd"),
            ("zstd;q=0, *;q=0.5", "br"),
            ("zstd;q=0, br;q=0, gzip", "gzip"),
            ("*;q=0, identity", None),
        ]:
            async with raw.get(url, headers={"Accept-Encoding": accept}) as resp:
                assert resp.headers.get("Content-Encoding") == coding, (accept, resp.headers)
                body = codings.decode_body(await resp.read(), coding or "", 10**6)
                assert json.loads(body)["session"]["stream"] == "live"
            if accept == "zstd, *;q=0.5":
                status = resp.headers["Cache-Status"]
    assert "hit" in status, status


async def test_a_client_that_accepts_no_compression_gets_plain_json(gptme) -> None:
    g = await gptme("0.35.1")
    await g.create("c1")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(
            g.url("/api/v2/conversations/c1"), headers={"Accept-Encoding": "identity"}
        ) as resp:
            assert "Content-Encoding" not in resp.headers
            assert (await resp.json())["session"]["status"] == "unknown"


async def test_a_304_never_hides_a_change_of_state(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome(kind="error", start_delay=0.2))
    sid = await g.create("c1")
    url = g.url("/api/v2/conversations/c1")
    await g.get("c1")
    async with http.get(url) as first:
        etag = first.headers["ETag"]
        assert ";sc=" in etag
    # Nothing changed: the upstream's 304 is relayed, with the merged tag.
    async with http.get(url, headers={"If-None-Match": etag}) as again:
        assert again.status == 304
        assert again.headers["ETag"] == etag
    # A step fails: the upstream's log (and so its own ETag) is unchanged,
    # but the state is not, so the client must get a 200 with the error.
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")
    async with http.get(
        g.url("/api/v2/conversations/c1", direct=True),
        headers={"If-None-Match": etag.split(";")[0] + '"'},
    ) as direct:
        assert direct.status == 304  # the upstream alone would have hidden it
    async with http.get(url, headers={"If-None-Match": etag}) as after:
        assert after.status == 200
        assert (await after.json())["session"]["status"] == "failed"
        assert after.headers["ETag"] != etag


async def test_auth_is_passed_through_and_used_by_the_subscription(gptme, http) -> None:
    g = await gptme("0.35.1", token="s3cret", outcome=Outcome(kind="error"))
    async with http.get(g.url("/api/v2/conversations/c1")) as denied:
        assert denied.status == 401
    g.headers = {"Authorization": "Bearer s3cret"}
    sid = await g.create("c1")
    await g.step("c1", sid)
    session = await g.wait_status("c1", "failed")
    assert session["stream"] == "live"


async def test_a_client_without_credentials_learns_nothing(gptme, http) -> None:
    g = await gptme("0.35.1", token="s3cret", outcome=Outcome(kind="error"))
    g.headers = {"Authorization": "Bearer s3cret"}
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")
    async with http.get(g.url("/api/v2/conversations/c1")) as resp:
        assert resp.status == 401
        assert "session" not in await resp.json()


async def test_the_upstream_host_check_passes_because_host_is_rewritten(gptme, http) -> None:
    g = await gptme("0.35.1", allowed_hosts={"127.0.0.1", "localhost"})
    await g.create("c1")
    headers = {"Host": "sidecar.example.com"}
    async with http.get(g.url("/api/v2/conversations/c1"), headers=headers) as resp:
        assert resp.status == 200


async def test_preserve_host_forwards_the_clients_host(gptme, http) -> None:
    g = await gptme("0.35.1", allowed_hosts={"127.0.0.1"}, sidecar_options={"preserve_host": True})
    async with http.get(g.url("/api/v2"), headers={"Host": "sidecar.example.com"}) as resp:
        assert resp.status == 403  # the upstream saw the foreign host, as asked


async def test_a_configured_credential_is_used_for_subscriptions(gptme) -> None:
    g = await gptme(
        "0.35.1",
        token="tok",
        outcome=Outcome(kind="error"),
        sidecar_options={"upstream_authorization": "Bearer tok"},
    )
    g.headers = {"Authorization": "Bearer tok"}
    sid = await g.create("c1")
    await g.get("c1")
    g.sidecar.registry.get("c1")
    await g.step("c1", sid)
    assert (await g.wait_status("c1", "failed"))["stream"] == "live"


async def test_a_refused_stream_is_reported_lost(gptme, http) -> None:
    # The client may read the conversation, but the sidecar's own credentials
    # for the stream are refused: the state says so.
    g = await gptme("0.35.1", token="tok", sidecar_options={"upstream_authorization": "Bearer no"})
    g.headers = {"Authorization": "Bearer tok"}
    await g.create("c1")
    state = await g.session("c1")
    assert state["stream"] in ("connecting", "lost")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "lost")
    assert (await g.session("c1"))["stream"] == "lost"


async def unmergeable_upstream(serve, start_sidecar):
    """A sidecar before an upstream whose answers cannot take the snapshot:
    ``nt`` says no-transform, any other id is plain text."""
    from aiohttp import web

    async def conv(request: web.Request) -> web.Response:
        if request.match_info["id"] == "nt":
            return web.json_response({"a": 1}, headers={"Cache-Control": "no-transform"})
        return web.Response(text="plain text", content_type="text/plain")

    app = web.Application()
    app.router.add_get("/api/v2/conversations/{id}", conv)
    app.router.add_get("/api/v2/conversations/{id}/events", conv)
    upstream = await serve(app)
    return await start_sidecar(str(upstream.make_url("")).rstrip("/"))


async def test_no_transform_and_non_json_pass_unchanged(serve, start_sidecar, http) -> None:
    sc = await unmergeable_upstream(serve, start_sidecar)
    async with http.get(sc.url + "/api/v2/conversations/nt") as resp:
        assert await resp.json() == {"a": 1}
    async with http.get(sc.url + "/api/v2/conversations/txt") as resp:
        assert await resp.text() == "plain text"


async def test_a_refused_client_polling_opens_no_stream_and_makes_no_state(gptme, http) -> None:
    g = await gptme("0.35.1", token="tok", sidecar_options={"reconnect_max": 30})
    for _ in range(5):
        async with http.get(
            g.url("/api/v2/conversations/c1"), headers={"Authorization": "Bearer bad"}
        ) as resp:
            assert resp.status == 401
    assert [p for m, p in g.fake.requests if p.endswith("/events")] == []
    assert g.sidecar.registry.get("c1") is None
    # Credentials the upstream accepts are observed at once.
    g.headers = {"Authorization": "Bearer tok"}
    await g.create("c1")
    await g.get("c1")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")


async def test_the_configured_credentials_serve_only_what_a_client_was_allowed(gptme, http) -> None:
    # Confused deputy: the sidecar holds a token of its own for streams; an
    # unauthenticated client must not make it open someone else's.
    g = await gptme("0.35.1", token="tok", sidecar_options={"upstream_authorization": "Bearer tok"})
    g.headers = {"Authorization": "Bearer tok"}
    await g.create("victim", direct=True)
    async with http.get(g.url("/api/v2/conversations/victim")) as resp:
        assert resp.status == 401
    assert [p for m, p in g.fake.requests if p.endswith("/events")] == []
    assert g.sidecar.registry.get("victim") is None


async def test_an_unauthenticated_flood_costs_no_stream_and_evicts_nothing(gptme, http) -> None:
    g = await gptme(
        "0.35.1", token="tok", sidecar_options={"max_snapshots": 50}, outcome=Outcome(kind="error")
    )
    g.headers = {"Authorization": "Bearer tok"}
    sid = await g.create("real")
    await g.get("real")
    await g.step("real", sid)
    await g.wait_status("real", "failed")
    streams_before = len([p for m, p in g.fake.requests if p.endswith("/events")])
    for i in range(2000):
        async with http.get(g.url(f"/api/v2/conversations/flood-{i}")) as resp:
            assert resp.status == 401
    assert len([p for m, p in g.fake.requests if p.endswith("/events")]) == streams_before
    assert len(g.sidecar.registry.conversations()) == 1
    assert (await g.session("real"))["status"] == "failed"


async def test_an_unauthenticated_long_poll_is_not_held(gptme, http) -> None:
    g = await gptme("0.35.1", token="tok")
    g.headers = {"Authorization": "Bearer tok"}
    await g.create("c1")
    url, etag = await g.live_etag("c1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.get(url, headers={"If-None-Match": etag, "Prefer": "wait=10"}) as resp:
        assert resp.status == 401  # answered at once: no timing to watch
    assert loop.time() - started < 5


async def test_eviction_forgets_the_least_recently_read(gptme, http) -> None:
    g = await gptme("0.31.0", sidecar_options={"max_snapshots": 3})
    for cid in ("a", "b", "c"):
        await g.create(cid)
    await g.get("a")  # read again: now the most recent
    await g.create("d")
    assert {c.id for c in g.sidecar.registry.conversations()} == {"a", "c", "d"}


async def test_an_answer_passed_without_the_snapshot_is_said_once_a_minute(
    serve, start_sidecar, http, caplog
) -> None:
    sc = await unmergeable_upstream(serve, start_sidecar)
    caplog.set_level("WARNING", logger="sidecar.proxy")
    for _ in range(5):
        async with http.get(sc.url + "/api/v2/conversations/txt") as resp:
            assert await resp.text() == "plain text"
    said = [r for r in caplog.records if r.getMessage() == "answer passed without the snapshot"]
    assert len(said) == 1 and said[0].reason == "not_json"
