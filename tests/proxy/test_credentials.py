"""Every way the upstream authenticates is a credential to the sidecar
(sidecar.credentials): gptme 0.35.1's bearer token, its cookie and
``?token=``; opencode 1.18.33's HTTP Basic and ``?auth_token=``, both checked
on the released servers. A client with a query token is told apart from
one without, its stream is opened with it, and nobody without it is held
or served from the cache."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.app import PROXY
from sidecar.core.profile import load_profile

from ..conftest import eventually
from ..real import servers

GPTME = load_profile("gptme").credentials
OPENCODE = load_profile("opencode").credentials


def test_the_profiles_name_every_credential_their_upstream_reads() -> None:
    anonymous = GPTME.fingerprint(CIMultiDict(), "/api/v2/conversations/c")
    token = GPTME.fingerprint(CIMultiDict(), "/api/v2/conversations/c?token=abc")
    other = GPTME.fingerprint(CIMultiDict(), "/api/v2/conversations/c?token=abd")
    assert len({anonymous, token, other}) == 3
    # The other parameters do not matter; their order neither.
    assert GPTME.fingerprint(CIMultiDict(), "/c?a=1&token=abc") == token
    # The name as Werkzeug reads it: decoded.
    assert GPTME.fingerprint(CIMultiDict(), "/c?%74oken=abc&b=2") != anonymous
    assert GPTME.of(CIMultiDict(), "/c?token=abc").query == ("token=abc",)
    bearer = GPTME.fingerprint(CIMultiDict(Authorization="Bearer abc"), "/c")
    cookie = GPTME.fingerprint(CIMultiDict(Cookie="gptme_token=abc"), "/c")
    assert len({anonymous, token, bearer, cookie}) == 4
    # A credential header its Connection names is hop-by-hop: not one.
    hop = CIMultiDict({"Authorization": "Bearer abc", "Connection": "Authorization"})
    assert GPTME.fingerprint(hop, "/c") == anonymous
    assert OPENCODE.of(CIMultiDict(), "/session/s?auth_token=eA==").query == ("auth_token=eA==",)
    assert OPENCODE.fingerprint(CIMultiDict(), "/session/s?token=eA==") == anonymous


# ----------------------------------------------------- gptme 0.35.1


async def _put(http: aiohttp.ClientSession, url: str, cid: str, **kwargs: Any) -> None:
    body = servers.gptme_conversation(cid, "ok")
    async with http.put(url, json=body, **kwargs) as resp:
        assert resp.status == 200, await resp.text()


async def test_gptme_0_35_1_takes_a_query_token_and_so_does_the_sidecar(
    real_gptme_0_35_1: servers.Process, start_sidecar: Any, http: aiohttp.ClientSession
) -> None:
    upstream = real_gptme_0_35_1.running()
    sidecar = await start_sidecar(upstream.url, cache="events")
    cid = f"cred-{int(time.time() * 1000) % 1000000}"
    token = f"?token={servers.GPTME_TOKEN}"
    await _put(http, f"{upstream.url}/api/v2/conversations/{cid}{token}", cid)
    async with http.get(f"{upstream.url}/api/v2/conversations/{cid}{token}") as resp:
        assert resp.status == 200  # the released server takes it
    async with http.get(f"{upstream.url}/api/v2/conversations/{cid}") as resp:
        assert resp.status == 401
    url = f"{sidecar.url}/api/v2/conversations/{cid}"
    async with http.get(url + token) as resp:
        assert resp.status == 200
        assert "session" in await resp.json()
    # The sidecar's own stream for this client carries its query token:
    # 0.35.1 refuses a stream without one.
    await eventually(lambda: sidecar.snapshot(cid).stream == "live", timeout=10)
    for _ in range(20):
        async with http.get(url + token) as resp:
            tag = resp.headers["ETag"]
            if resp.headers.get("Cache-Status", "").startswith("sidecar; hit"):
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the token's reads never became hits")
    # Without the token: never held (the README's "answered at once"),
    # never served from the cache; and its 401 leaves the token's hits be.
    started = time.monotonic()
    async with http.get(url, headers={"If-None-Match": tag, "Prefer": "wait=5"}) as resp:
        assert resp.status == 401
    assert time.monotonic() - started < 3.0  # not held its 5 s
    async with http.get(url) as resp:
        assert resp.status == 401
        assert "hit" not in resp.headers.get("Cache-Status", "")
    async with http.get(url + token) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Status"].startswith("sidecar; hit")


# ------------------------------------------------- opencode 1.18.33

PASSWORD = "pw-of-the-test"
BASIC = base64.b64encode(f"opencode:{PASSWORD}".encode()).decode()


@pytest.fixture(scope="module")
def locked_opencode() -> Iterator[servers.Process]:
    """opencode with OPENCODE_SERVER_PASSWORD set (the shared one has none)."""
    model = servers.start_model()
    try:
        process = servers.start_opencode(model.url, password=PASSWORD)
        try:
            yield process
        finally:
            process.stop()
    finally:
        model.stop()


async def test_opencode_takes_basic_or_auth_token_and_so_does_the_sidecar(
    locked_opencode: servers.Process, start_sidecar: Any, http: aiohttp.ClientSession
) -> None:
    upstream = locked_opencode
    query = f"?auth_token={BASIC}"
    async with http.post(f"{upstream.url}/session{query}", json={}) as resp:
        assert resp.status == 200
        sid = (await resp.json())["id"]
    for how, expected in (
        ({}, 401),
        ({"params": {"auth_token": BASIC}}, 200),
        ({"headers": {"Authorization": f"Basic {BASIC}"}}, 200),
        ({"params": {"auth_token": base64.b64encode(b"opencode:wrong").decode()}}, 401),
    ):
        async with http.get(f"{upstream.url}/session/{sid}", **how) as resp:
            assert resp.status == expected, how
    sidecar = await start_sidecar(upstream.url, profile="opencode", cache="events")
    url = f"{sidecar.url}/session/{sid}"
    async with http.get(url + query) as resp:
        assert resp.status == 200
        assert "sidecar" in await resp.json()
    # One shared stream, opened with this client's query credential.
    await eventually(lambda: sidecar.snapshot(sid).stream == "live", timeout=10)
    basic = {"Authorization": f"Basic {BASIC}"}
    for _ in range(20):
        async with http.get(url, headers=basic) as resp:
            if resp.headers.get("Cache-Status", "").startswith("sidecar; hit"):
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the Basic client's reads never became hits")
    async with http.get(url) as resp:
        assert resp.status == 401
        assert "hit" not in resp.headers.get("Cache-Status", "")


async def test_a_flood_of_anonymous_long_polls_holds_nothing(gptme) -> None:
    """After a `?token=` client's read, 1,500 clients without it send its
    current tag with `Prefer: wait`: none is held (every one gets the
    upstream's 401 at once), so the token's own long-poll still finds a slot."""
    g = await gptme("0.35.1", sidecar_options={"max_held": 1000}, token="t0k")
    g.headers = {"Authorization": "Bearer t0k"}
    await g.create("c1")
    url = g.url("/api/v2/conversations/c1")
    async with g.http.get(url + "?token=t0k") as resp:
        assert resp.status == 200
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    async with g.http.get(url + "?token=t0k") as resp:
        tag = resp.headers["ETag"]
    wait = {"If-None-Match": tag, "Prefer": "wait=5"}
    connector = aiohttp.TCPConnector(limit=200)
    longpoll = g.sidecar.server.app[PROXY].longpoll
    most_held = 0
    flooding = True

    async def watch() -> None:
        nonlocal most_held
        while flooding:
            most_held = max(most_held, longpoll.held)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(connector=connector) as many:

        async def anonymous() -> int:
            async with many.get(url, headers=wait) as resp:
                return resp.status

        try:
            statuses = await asyncio.wait_for(
                asyncio.gather(*(anonymous() for _ in range(1500))), 60
            )
        finally:
            flooding = False
            await watcher
    assert set(statuses) == {401}
    assert most_held == 0  # none was held (each would have waited its 5 s)
    started = time.monotonic()
    async with g.http.get(url + "?token=t0k", headers={**wait, "Prefer": "wait=0.5"}) as resp:
        assert resp.status == 304  # held its 0.5 s, then "not modified"
    assert time.monotonic() - started >= 0.45
