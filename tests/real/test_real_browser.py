"""Conformance: gptme-server 0.35.1's own web UI (``webui-dist`` in its wheel)
in a real headless Chromium, opened at the sidecar's address: the UI talks to
the origin that served it, so the sidecar is in front of a real browser
client. What the browser's own fetch of the conversation reads is what a
person sees: the sidecar's ``status``, whatever coding Chromium asked for.
A tab opened late reads the conversation's state in its stream's first
event (``connected``) and shows it: mid-step, its Stop button."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from sidecar.app import PROXY

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


async def open_ui(page: Page, gptme: Gptme, cid: str, direct: bool = False) -> None:
    """The UI's conversation page, its server set to the sidecar's origin with
    the server's token (its own ``#baseUrl=...&userToken=...`` link);
    ``direct``: the upstream's own origin instead."""
    base = gptme.upstream.url if direct else gptme.sidecar.url
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


async def until(page: Page, expression: str, timeout: float = 15) -> Any:
    """The value of ``expression`` in the page once it is truthy (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await page.evaluate(expression)
        if value:
            return value
        assert loop.time() < deadline, f"{expression} stayed {value!r} for {timeout} s"
        await asyncio.sleep(0.1)


STOP_BUTTON = "document.querySelector('[aria-label=\"Stop generation\"]') !== null"


@pytest.mark.parametrize("direct", [False, True])
async def test_the_web_ui_opened_mid_step_shows_it_generating(
    gptme: Gptme, http: aiohttp.ClientSession, tmp_path: Any, direct: bool
) -> None:
    """Opened at the sidecar mid-step, the UI's EventSource reads ``generating:
    true`` in ``connected`` and it shows its Stop button; opened at gptme
    itself (``direct``), it reads its new session's ``false`` and shows none."""
    cid, sid = await gptme.create("slow")
    try:
        assert await gptme.step(cid, sid) == 200
        await gptme.poller.wait(cid, "generating")
        async with chromium(tmp_path, http) as page:
            await open_ui(page, gptme, cid, direct=direct)
            message = await page.event(
                "Network.eventSourceMessageReceived", lambda p: '"connected"' in p["data"], 20
            )
            connected = json.loads(message["data"])
            if direct:
                await asyncio.sleep(2)  # what the UI shows once it has read the event
                stop = await page.evaluate(STOP_BUTTON)
            else:
                stop = await until(page, STOP_BUTTON)
        state = await gptme.poller.state(cid)
    finally:
        await gptme.post(cid, "/interrupt", {"session_id": sid})
    assert state["generating"] is True  # the step still ran when the UI was read
    assert connected["session_id"] != sid  # the tab's own session, kept
    assert (connected["generating"], stop) == (not direct, not direct)
    if not direct:
        # The tab's EventSource (no credentials of its own: gptme takes it)
        # was served from the sidecar's own stream.
        assert gptme.sidecar.server.app[PROXY].fanout.served >= 1


@pytest.mark.parametrize("direct", [False, True])
async def test_the_web_ui_opened_while_a_tool_waits_reads_the_tool(
    gptme: Gptme, http: aiohttp.ClientSession, tmp_path: Any, direct: bool
) -> None:
    """Opened at the sidecar while a tool waits for a human, the ``connected``
    the UI's EventSource reads carries the tool; opened at gptme itself, none.

    (What it then shows is not checked: the UI fails on this tool use itself,
    "Cannot read properties of null (reading 'length')", as it does on the
    same ``tool_pending`` read live: a function call's ``tooluse`` has
    ``args: null`` and ``content: null``.)"""
    cid, sid = await gptme.create("tool")
    async with gptme.witness(cid) as witness:
        assert await gptme.step(cid, sid) == 200
        pending = await witness.wait_for("tool_pending")
        await gptme.poller.wait(cid, "awaiting_tool", witness)
        async with chromium(tmp_path, http) as page:
            await open_ui(page, gptme, cid, direct=direct)
            message = await page.event(
                "Network.eventSourceMessageReceived", lambda p: '"connected"' in p["data"], 20
            )
        connected = json.loads(message["data"])
        body = {"session_id": sid, "tool_id": pending["tool_id"], "action": "skip"}
        assert (await gptme.post(cid, "/tool/confirm", body))[0] == 200
    tools = [t["tool_id"] for t in connected["pending_tools"]]
    assert tools == ([] if direct else [pending["tool_id"]])
