"""A real headless Chromium (Debian's package), driven over the Chrome
DevTools Protocol: just enough to navigate, evaluate, read the network and
take a screenshot. Every wait is bounded; the caller stops the process
(``async with chromium(tmp_path) as browser``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: For the modules that need it: ``pytestmark = needs_chromium``.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it)"
)


class Page:
    """One page target: calls answered in order, events kept as they come."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []  # {"method": ..., "params": ...}

    async def _receive(self, timeout: float) -> dict[str, Any]:
        msg = dict(await asyncio.wait_for(self.ws.receive_json(), timeout))
        if "method" in msg:
            self.events.append(msg)
        return msg

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            msg = await self._receive(10)
            if msg.get("id") == call_id:
                assert "error" not in msg, msg
                return dict(msg["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def event(
        self, method: str, where: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """The params of the first event ``method`` (kept or to come) that
        ``where`` accepts; an AssertionError after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            for msg in self.events[seen:]:
                if msg["method"] == method and where(msg["params"]):
                    return dict(msg["params"])
            seen = len(self.events)
            left = deadline - loop.time()
            if left <= 0:
                methods = sorted({m["method"] for m in self.events})
                raise AssertionError(f"no {method} within {timeout} s; events seen: {methods}")
            with contextlib.suppress(asyncio.TimeoutError):
                await self._receive(left)


async def launch(tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Chromium started headless; its DevTools address once it listens."""
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
    try:
        assert proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "chromium exited before it listened"
            found = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
            if found:
                return proc, found.group(1)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Page]:
    """A page of a fresh Chromium, stopped however the block ends."""
    proc, devtools = await launch(tmp_path)
    try:
        async with http.get(f"http://{devtools}/json/list") as resp:
            (target,) = [t for t in await resp.json() if t["type"] == "page"]
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            yield Page(ws)
    finally:
        proc.kill()
        await proc.wait()
