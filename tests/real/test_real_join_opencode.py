"""Conformance: opencode 1.18.33's ``/event`` through the sidecar is followed by
opencode's own ``session.status`` for each session at work (``[stream.join]``).

opencode's ``server.connected`` says nothing of the sessions at work. Through
the sidecar it is followed by ``session.status`` ``busy`` for each, in the
shape the real server sends it (its ``id`` included), which
``@opencode-ai/sdk`` 1.18.33's own client reads and whose ``Event`` union
type-checks it (``tsc --strict``, against the SDK's declarations).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from . import servers
from .test_real_opencode import Opencode, opencode  # noqa: F401 (the fixture)

HERE = Path(__file__).resolve().parent
EVENT_ID = re.compile(r"evt_[0-9a-f]{12}[0-9A-Za-z]{14}")


async def first_events(url: str, http: aiohttp.ClientSession, n: int) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with http.get(url, timeout=timeout) as resp:
        assert resp.status == 200, await resp.text()
        out = []
        for _ in range(n):
            block = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            assert block.startswith(b"data: "), block
            out.append(orjson.loads(block[len(b"data: ") :]))
    return out


async def sdk_events(base_url: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` events as the SDK's own client yields them."""
    servers.require(servers.sdk_dir(), f"@opencode-ai/sdk {servers.OPENCODE_VERSION}")
    argv = ["node", str(HERE / "opencode_sdk.mjs"), str(servers.sdk_dir()), base_url, str(n)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    events = json.loads(out)
    assert isinstance(events, list)
    return events


def sdk_type_errors(events: list[dict[str, Any]], where: Path) -> str:
    """What ``tsc --strict`` says of these events as the SDK's ``Event[]`` ("" if none)."""
    (where / "node_modules").symlink_to(servers.sdk_dir() / "node_modules")
    source = where / "events.ts"
    source.write_text(
        'import type { Event } from "@opencode-ai/sdk/v2"\n'
        f"export const events: Event[] = {json.dumps(events)}\n",
        encoding="utf-8",
    )
    tsc = servers.sdk_dir() / "node_modules" / ".bin" / "tsc"
    flags = ["--noEmit", "--strict", "--module", "nodenext", "--moduleResolution", "nodenext"]
    done = subprocess.run(
        [str(tsc), *flags, str(source)], capture_output=True, text=True, timeout=60
    )
    return "" if done.returncode == 0 else done.stdout + done.stderr


async def test_a_stream_opened_mid_prompt_is_told_the_session_is_busy(
    opencode: Opencode,  # noqa: F811
    tmp_path: Path,
) -> None:
    sid = await opencode.create()
    async with opencode.witness(sid) as witness:
        await opencode.prompt(sid, "slow")
        real = await witness.wait_for("session.status")
        await opencode.poller.wait(sid, "generating", witness)
        (direct,) = await first_events(opencode.upstream.url + "/event", opencode.http, 1)
        told = await first_events(opencode.sidecar.url + "/event", opencode.http, 2)
        through_sdk = await sdk_events(opencode.sidecar.url, 2)
        assert (await opencode.post(f"/session/{sid}/abort"))[0] == 200
    # The upstream's own first event, as it came (each connection has its own id).
    assert told[0]["type"] == direct["type"] == "server.connected"
    assert told[0].keys() == direct.keys() and told[0]["properties"] == direct["properties"]
    # Then the session's status, in the shape the real server sends it.
    status = told[1]
    assert real["properties"]["status"] == {"type": "busy"}
    assert status.keys() == real.keys()
    assert status["properties"] == {"sessionID": sid, "status": {"type": "busy"}}
    assert EVENT_ID.fullmatch(real["id"]) and EVENT_ID.fullmatch(status["id"])
    # Time-ordered, as opencode's are: its millisecond is not before the first event's.
    assert int(status["id"][4:16], 16) >> 12 >= int(told[0]["id"][4:16], 16) >> 12
    # opencode's own client reads it, and its Event union takes it.
    assert [e["type"] for e in through_sdk] == ["server.connected", "session.status"]
    assert through_sdk[1]["properties"] == status["properties"]
    assert sdk_type_errors(through_sdk, tmp_path) == ""


def test_the_type_check_refuses_an_event_opencode_would_not_send(tmp_path: Path) -> None:
    """The check bites: without its id, or with a status opencode has not, it fails."""
    event = {"type": "session.status", "properties": {"sessionID": "s", "status": {"type": "busy"}}}
    (tmp_path / "a").mkdir()
    assert "'id' is missing" in sdk_type_errors([event], tmp_path / "a")
    event = {"id": "evt_x", **event, "properties": {"sessionID": "s", "status": {"type": "x"}}}
    (tmp_path / "b").mkdir()
    assert sdk_type_errors([event], tmp_path / "b") != ""
