"""Conformance: gptme-server 0.35.1's own web UI (``webui-dist`` in its wheel)
in a real headless Chromium, opened at the sidecar's address: the UI talks to
the origin that served it, so the sidecar is in front of a real browser
client. What the browser's own fetch of the conversation reads is what a
person sees: the sidecar's ``status``, whatever coding Chromium asked for."""

from __future__ import annotations

import itertools
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from ..chromium import Page, chromium, needs_chromium
from . import servers
from .test_real_gptme import Gptme

pytestmark = [needs_chromium, pytest.mark.flaky(reruns=2, only_rerun=servers.UPSTREAM_FAULTS)]
_ids = itertools.count(1)


@pytest.fixture
async def gptme(
    real_gptme_0_35_1: servers.Process, start_sidecar: Any, http: aiohttp.ClientSession
) -> Gptme:
    upstream = real_gptme_0_35_1.running()
    sidecar = await start_sidecar(upstream.url)
    return Gptme(upstream, sidecar, http)


def header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


async def open_ui(page: Page, gptme: Gptme, cid: str) -> None:
    """The UI's conversation page, its server set to the sidecar's origin with
    the server's token (its own ``#baseUrl=...&userToken=...`` link)."""
    base = gptme.sidecar.url
    token = servers.GPTME_TOKEN
    await page.call("Network.enable")
    await page.call(
        "Page.navigate",
        url=f"{base}/chat/{quote(cid)}#baseUrl={quote(base, safe='')}&userToken={token}",
    )


async def fetched(page: Page, url: str, timeout: float = 20) -> tuple[dict[str, Any], Any]:
    """The browser's own GET of ``url`` (any query: the UI asks ``?limit=50``):
    its response (headers as Chromium received them) and its body, which
    Chromium decoded."""
    try:
        sent = await page.event(
            "Network.requestWillBeSent",
            lambda p: p["request"]["url"].split("?")[0] == url and p["request"]["method"] == "GET",
            timeout,
        )
    except AssertionError:
        asked = [
            f"{e['params']['request']['method']} {e['params']['request']['url']}"
            for e in page.events
            if e["method"] == "Network.requestWillBeSent"
        ]
        raise AssertionError(f"the UI never fetched {url}; it asked for {asked}") from None
    rid = sent["requestId"]
    got = await page.event("Network.responseReceived", lambda p: p["requestId"] == rid, timeout)
    await page.event("Network.loadingFinished", lambda p: p["requestId"] == rid, timeout)
    body = await page.call("Network.getResponseBody", requestId=rid)
    assert not body["base64Encoded"]
    return got["response"], json.loads(body["body"])


async def test_the_web_ui_reads_the_sidecars_status_through_chromium(
    gptme: Gptme, http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    cid, sid = await gptme.create("401")
    assert await gptme.step(cid, sid) == 500  # 0.35.1 answers the early error
    await gptme.poller.wait(cid, "failed")
    async with chromium(tmp_path, http) as page:
        await open_ui(page, gptme, cid)
        response, doc = await fetched(page, gptme.conversation_url(cid))
    assert response["status"] == 200
    assert header(response["headers"], "Content-Encoding") == "zstd", response["headers"]
    assert doc["session"]["status"] == "failed", doc.get("session")
    assert "Incorrect API key" in doc["session"]["last_error"]
    assert doc["session"]["stream"] == "live"
