"""The status page in a real headless Chromium: a failed conversation appears on its own."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from sidecar.demo.fake import Outcome

from ..chromium import chromium, needs_chromium

SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "status-page.png"

pytestmark = needs_chromium


async def test_the_status_page_shows_a_failed_conversation_appear(gptme, http, tmp_path) -> None:
    g = await gptme(
        "0.31.0",
        sidecar_options={"admin_token": "page-token"},
        outcome=Outcome(kind="error", start_delay=0.1),
    )
    async with chromium(tmp_path, http) as page:
        await page.call("Page.enable")
        # What a person types into the browser's own prompt (HTTP Basic):
        # sent with the page and every request it makes, never in a URL.
        basic = base64.b64encode(b"me:page-token").decode()
        await page.call("Network.enable")
        await page.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {basic}"})
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
