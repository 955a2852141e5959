"""The sidecar's own endpoints: probes, metrics, state API, long-poll, limits."""

from __future__ import annotations

import asyncio
import base64
import socket

import aiohttp
import yarl

from sidecar.app import create_admin_app
from sidecar.demo.fake import FakeGptme, Outcome

from ..conftest import eventually

TOKEN = {"admin_token": "adm"}
ADMIN = {"Authorization": "Bearer adm"}


async def test_healthz_never_depends_on_the_upstream(start_sidecar, http) -> None:
    sc = await start_sidecar("http://127.0.0.1:9")  # nothing listens there
    async with http.get(sc.url + "/_sidecar/healthz") as resp:
        assert resp.status == 200


async def test_refused_upstream_at_start_then_ready_once_it_answers(
    serve, start_sidecar, http
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sc = await start_sidecar(f"http://127.0.0.1:{port}", probe_interval=0.1)
    async with http.get(sc.url + "/api/v2/conversations/c1") as resp:
        assert resp.status == 502
    await asyncio.sleep(0.2)
    async with http.get(sc.url + "/_sidecar/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
        assert "unreachable" in body["reason"]
        assert body["upstream"]["last_probe_at"].endswith("Z")  # ISO 8601, as every time
    await serve(FakeGptme().app, port=port)

    async def ready() -> bool:
        async with http.get(sc.url + "/_sidecar/readyz") as resp:
            return resp.status == 200

    for _ in range(100):
        if await ready():
            break
        await asyncio.sleep(0.05)
    assert await ready()


async def test_metrics_count_requests_events_and_merges_without_ids(gptme, http) -> None:
    g = await gptme("0.31.0", sidecar_options=TOKEN, outcome=Outcome(kind="error"))
    sid = await g.create("secret-conversation-id")
    await g.step("secret-conversation-id", sid)
    await g.wait_status("secret-conversation-id", "failed")
    async with http.get(g.sidecar.url + "/_sidecar/metrics", headers=ADMIN) as resp:
        text = await resp.text()
    assert 'sidecar_requests_total{code="200",kind="enrich",method="GET"}' in text
    assert 'sidecar_requests_total{code="200",kind="trigger",method="POST"}' in text
    assert 'sidecar_events_total{type="error"} 1.0' in text
    assert 'sidecar_merges_total{result="merged"}' in text
    assert 'sidecar_subscriptions{stream="live"} 1.0' in text
    assert "sidecar_upstream_latency_seconds_bucket" in text
    assert "secret-conversation-id" not in text


async def test_state_api_lists_conversations_and_their_transitions(gptme, http) -> None:
    g = await gptme(
        "0.31.0", sidecar_options=TOKEN, outcome=Outcome(kind="error", start_delay=0.05)
    )
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")
    async with http.get(g.sidecar.url + "/_sidecar/conversations", headers=ADMIN) as resp:
        (item,) = (await resp.json())["conversations"]
    assert (item["id"], item["status"]) == ("c1", "failed")
    async with http.get(g.sidecar.url + "/_sidecar/conversations/c1", headers=ADMIN) as resp:
        detail = await resp.json()
    statuses = [t["status"] for t in detail["transitions"]]
    assert statuses[-3:] == ["starting", "generating", "failed"]
    assert detail["subscription"]["stream"] == "live"
    async with http.get(g.sidecar.url + "/_sidecar/conversations/nope", headers=ADMIN) as resp:
        assert resp.status == 404


async def test_status_page_is_served_with_the_token(gptme, http) -> None:
    g = await gptme(sidecar_options=TOKEN)
    basic = "Basic " + base64.b64encode(b"anyone:adm").decode()  # a browser's own prompt
    async with http.get(g.sidecar.url + "/_sidecar/", headers={"Authorization": basic}) as resp:
        assert resp.status == 200
        assert "sidecar: conversations" in await resp.text()
        assert "token" not in str(resp.url)
    async with http.get(g.sidecar.url + "/_sidecar/") as resp:
        assert resp.status == 401
        challenges = resp.headers.getall("WWW-Authenticate")
        assert any(c.startswith("Basic") for c in challenges), challenges


async def test_without_a_token_only_the_probes_are_served(gptme, http) -> None:
    g = await gptme("0.31.0", outcome=Outcome(kind="error"))
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "failed")
    for path in ("/_sidecar/conversations", "/_sidecar/conversations/c1", "/_sidecar/",
                 "/_sidecar/metrics"):  # fmt: skip
        async with http.get(g.sidecar.url + path, headers={"Host": "localhost"}) as resp:
            assert resp.status == 404, path
            text = await resp.text()
            assert "admin_token" in text and "c1" not in text
    assert [p for _, p in g.fake.requests if p.startswith("/_sidecar")] == []  # not proxied
    async with http.get(g.sidecar.url + "/_sidecar/healthz") as resp:
        assert resp.status == 200
    async with http.get(g.sidecar.url + "/_sidecar/readyz") as resp:
        assert resp.status == 200


async def test_a_rebound_host_name_is_refused(gptme, http) -> None:
    g = await gptme(sidecar_options=TOKEN)
    url = g.sidecar.url + "/_sidecar/conversations"
    for host, status in (("attacker.example", 421), ("localhost:8080", 200), ("10.1.2.3", 200)):
        async with http.get(url, headers={**ADMIN, "Host": host}) as resp:
            assert resp.status == status, host


async def test_the_admin_port_binds_loopback_and_serves_state_there_without_a_token(
    gptme, http
) -> None:
    g = await gptme(sidecar_options={"admin_port": 0})
    server = g.sidecar.server
    assert server.admin_runner is not None
    assert server.admin_runner.addresses[0][0] == "127.0.0.1"
    base = f"http://127.0.0.1:{server.admin_port}"
    async with http.get(base + "/_sidecar/conversations") as resp:
        assert resp.status == 200
    async with http.get(base + "/_sidecar/conversations", headers={"Host": "evil.test"}) as resp:
        assert resp.status == 421


async def test_an_admin_port_open_to_the_network_needs_the_token(gptme, http) -> None:
    g = await gptme(sidecar_options={"admin_port": 0, "admin_host": "0.0.0.0"})
    base = f"http://127.0.0.1:{g.sidecar.server.admin_port}"
    async with http.get(base + "/healthz") as resp:
        assert resp.status == 200
    for path in ("/metrics", "/_sidecar/conversations"):
        async with http.get(base + path) as resp:
            assert resp.status == 404, path


async def test_admin_port_and_token(serve, start_sidecar, http) -> None:
    fake = FakeGptme()
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    sc = await start_sidecar(
        upstream, admin_port=1, admin_token="adm"
    )  # port set by the test server
    admin = await serve(create_admin_app(sc.server.app))
    base = str(admin.make_url("")).rstrip("/")
    # The main port now proxies every path, /_sidecar/ included.
    async with http.get(sc.url + "/_sidecar/healthz") as resp:
        assert resp.status == 404 and fake.requests[-1][1] == "/_sidecar/healthz"
    async with http.get(base + "/healthz") as resp:
        assert resp.status == 200  # probes need no token
    async with http.get(base + "/metrics") as resp:
        assert resp.status == 401
    async with http.get(base + "/metrics", headers={"Authorization": "Bearer adm"}) as resp:
        assert resp.status == 200
    async with http.get(base + "/_sidecar/conversations?token=adm") as resp:
        assert resp.status == 401  # a token in a URL ends up in logs: not accepted
    async with http.get(base + "/_sidecar/conversations", headers=ADMIN) as resp:
        assert resp.status == 200


async def test_long_poll_follows_changes_without_busy_polling(gptme, http) -> None:
    g = await gptme("0.35.1", outcome=Outcome(kind="error", start_delay=0.5))
    sid = await g.create("c1")
    url, etag = await g.live_etag("c1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    step = asyncio.create_task(g.step("c1", sid))
    polls, status = 0, "unknown"
    while status != "failed":
        polls += 1
        async with http.get(url, headers={"If-None-Match": etag, "Prefer": "wait=10"}) as resp:
            assert resp.status == 200  # held until something changed, never a stale 304
            etag = resp.headers["ETag"]
            status = (await resp.json())["session"]["status"]
    assert polls <= 6  # one answer per change, not a busy loop
    assert loop.time() - started < 3
    await step


async def test_long_poll_without_change_is_held_for_the_wait_then_304(gptme, http) -> None:
    g = await gptme("0.35.1")
    await g.create("c1")
    url, etag = await g.live_etag("c1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.get(url, headers={"If-None-Match": etag, "Prefer": "wait=0.5"}) as resp:
        assert resp.status == 304
    assert 0.45 <= loop.time() - started < 2


async def test_long_poll_with_a_stale_tag_answers_at_once(gptme, http) -> None:
    g = await gptme("0.35.1")
    await g.create("c1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    headers = {"If-None-Match": 'W/"old;sc=0000000000000000"', "Prefer": "wait=10"}
    async with http.get(g.url("/api/v2/conversations/c1"), headers=headers) as resp:
        assert resp.status == 200
    assert loop.time() - started < 2


async def test_a_body_over_the_limit_is_a_413(gptme, http) -> None:
    g = await gptme(sidecar_options={"max_request_body": 1000})
    async with http.post(g.url("/api/v2/conversations/c1"), data=b"x" * 2000) as resp:
        assert resp.status == 413
        assert "limit" in (await resp.json())["error"]

    async def chunks():
        for _ in range(10):
            yield b"y" * 500

    async with http.post(g.url("/api/v2/conversations/c1"), data=chunks()) as resp:
        assert resp.status == 413


async def test_an_oversized_header_is_a_clear_4xx(gptme, http) -> None:
    g = await gptme()
    async with http.get(g.url("/api/v2"), headers={"X-Big": "z" * 70000}) as resp:
        assert 400 <= resp.status < 500


async def test_long_poll_works_without_an_upstream_etag(gptme, http) -> None:
    # gptme 0.31.0 sends no ETag: the sidecar's own tag still lets a client wait.
    g = await gptme("0.31.0", outcome=Outcome(kind="error", start_delay=0.3))
    sid = await g.create("c1")
    url, etag = await g.live_etag("c1")
    assert etag.startswith('W/";sc=')
    step = asyncio.create_task(g.step("c1", sid))
    status = "unknown"
    while status != "failed":
        async with http.get(url, headers={"If-None-Match": etag, "Prefer": "wait=5"}) as resp:
            assert resp.status == 200  # never a 304: nothing vouches for the body
            etag = resp.headers["ETag"]
            status = (await resp.json())["session"]["status"]
    await step


async def test_a_new_message_wakes_a_held_get(gptme, http) -> None:
    g = await gptme("0.31.0")
    await g.create("c1")
    url, etag = await g.live_etag("c1")
    loop = asyncio.get_running_loop()

    async def post_later() -> None:
        await asyncio.sleep(0.3)
        async with http.post(url, json={"role": "user", "content": "more"}) as resp:
            assert resp.status == 200

    poster = asyncio.create_task(post_later())
    started = loop.time()
    async with http.get(url, headers={"If-None-Match": etag, "Prefer": "wait=5"}) as resp:
        body = await resp.json()
    assert 0.25 < loop.time() - started < 2
    assert body["log"][-1]["content"] == "more"
    await poster


async def test_long_polls_held_at_shutdown_are_answered_at_once(gptme) -> None:
    g = await gptme("0.35.1")
    await g.create("c1")
    url, etag = await g.live_etag("c1")
    # A connection of its own: a poller's, that has only ever sent GETs.
    async with aiohttp.ClientSession() as poller:
        held = asyncio.create_task(
            poller.get(url, headers={"If-None-Match": etag, "Prefer": "wait=30"})
        )
        await asyncio.sleep(0.2)  # the poll is held by now
        loop = asyncio.get_running_loop()
        started = loop.time()
        await g.sidecar.server.stop(grace=10)
        resp = await asyncio.wait_for(held, 2)
        assert resp.status == 304  # nothing changed: the same answer, just not 30 s later
        assert resp.headers["Connection"] == "close"  # the next poll goes elsewhere
        resp.release()
        assert loop.time() - started < 2


async def test_a_tag_made_stale_by_new_content_is_answered_at_once(gptme, http) -> None:
    # 0.31.0 sends no ETag: the sidecar's tag must still cover the log it served.
    g = await gptme("0.31.0")
    await g.create("c1")
    url, etag = await g.live_etag("c1")
    conv = g.sidecar.registry.get("c1")
    epoch = conv.epoch
    direct = g.url("/api/v2/conversations/c1", direct=True)
    async with http.post(direct, json={"role": "user", "content": "more"}):
        pass  # straight to the upstream: the sidecar learns of it from the event only
    await eventually(lambda: conv.epoch != epoch)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.get(url, headers={"If-None-Match": etag, "Prefer": "wait=10"}) as resp:
        assert resp.status == 200
        body = await resp.json()
        assert resp.headers["ETag"] != etag
    assert body["log"][-1]["content"] == "more"
    assert loop.time() - started < 5  # not held for the 10 s wait


async def test_an_admin_path_spelt_with_escapes_is_the_admins_on_both_servers(gptme, http) -> None:
    """aiohttp matches routes on the decoded path (``/%5Fsidecar/`` is
    ``/_sidecar/`` to it): the front door hands such a GET to it too, so the
    answer does not depend on the server, and nothing of it is proxied."""
    for front_door in (True, False):
        g = await gptme("0.31.0", sidecar_options={"front_door": front_door})
        for path in ("/%5Fsidecar/metrics", "/%5fsidecar/conversations", "/_%73idecar/"):
            async with http.get(
                yarl.URL(g.sidecar.url + path, encoded=True), headers={"Host": "localhost"}
            ) as resp:
                assert resp.status == 404, (front_door, path)
                assert "admin_token" in await resp.text()
        async with http.get(yarl.URL(g.sidecar.url + "/%5Fsidecar/healthz", encoded=True)) as resp:
            assert resp.status == 200
        assert [p for _, p in g.fake.requests if "sidecar" in p] == [], front_door
