"""The status page in a real headless Chromium: a failed conversation appears on its own."""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.demo.fake import Outcome

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "status-page.png"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it)"
)


class Page:
    """Just enough of the Chrome DevTools Protocol: navigate, evaluate, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 10)
            if msg.get("id") == call_id:
                assert "error" not in msg, msg
                return dict(msg["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


async def launch(tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        "--window-size=1100,500",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert line, "chromium exited before it listened"
        found = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
        if found:
            return proc, found.group(1)


async def test_the_status_page_shows_a_failed_conversation_appear(gptme, http, tmp_path) -> None:
    g = await gptme(
        "0.31.0",
        sidecar_options={"admin_token": "page-token"},
        outcome=Outcome(kind="error", start_delay=0.1),
    )
    proc, devtools = await launch(tmp_path)
    try:
        async with http.get(f"http://{devtools}/json/list") as resp:
            (target,) = [t for t in await resp.json() if t["type"] == "page"]
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            # What a person types into the browser's own prompt (HTTP Basic):
            # sent with the page and every request it makes, never in a URL.
            basic = base64.b64encode(b"me:page-token").decode()
            await page.call("Network.enable")
            await page.call(
                "Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {basic}"}
            )
            await page.call("Page.navigate", url=g.sidecar.url + "/_sidecar/")
            for _ in range(100):
                if await page.evaluate(
                    "document.getElementById('meta').textContent.includes('refreshed')"
                ):
                    break
                await asyncio.sleep(0.1)
            assert await page.evaluate("document.querySelectorAll('#rows tr').length") == 0

            sid = await g.create("broken-key")
            await g.step("broken-key", sid)
            row = "document.querySelector('#rows tr[data-status=\"failed\"]')"
            for _ in range(100):  # the page refreshes itself every second
                if await page.evaluate(f"{row} !== null"):
                    break
                await asyncio.sleep(0.1)
            assert await page.evaluate(f"{row}.dataset.id") == "broken-key"
            assert "invalid_api_key" in await page.evaluate(
                f"{row}.querySelector('.error').textContent"
            )

            shot = await page.call("Page.captureScreenshot", format="png")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
            assert SCREENSHOT.read_bytes().startswith(b"\x89PNG")
    finally:
        proc.kill()
        await proc.wait()
