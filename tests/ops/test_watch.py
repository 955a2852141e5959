"""``sidecar watch``: one conversation's transitions, printed as they happen."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sidecar.demo.fake import Outcome

from ..conftest import eventually


async def watch(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "watch", *args,
        env={**clean, **(env or {})}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_watch_prints_each_transition_until_the_status_asked_for(gptme) -> None:
    g = await gptme(
        outcome=Outcome(kind="error", tokens=5, pace=0.05),
        sidecar_options={"admin_token": "t0k"},
    )
    sid = await g.create("c1")
    proc = await watch(
        "c1", "--url", g.sidecar.url, "--until", "failed", "--timeout", "30",
        "--interval", "0.05", env={"SIDECAR_ADMIN_TOKEN": "t0k"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"watching c1" in first
        now = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"now:" in now and b"unknown" in now
        await g.step("c1", sid)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    lines = out.decode().splitlines()
    statuses = [line.split()[1] for line in lines]
    assert statuses[-1] == "failed" and "generating" in statuses, lines
    assert statuses.index("generating") < statuses.index("failed")
    assert "last_error=Error code: 401" in lines[-1]


async def test_watch_reads_the_token_from_a_file_and_says_plainly_when_refused(
    gptme, tmp_path: Path
) -> None:
    g = await gptme(sidecar_options={"admin_token": "t0k"})
    await g.create("c1")
    refused = await watch("c1", "--url", g.sidecar.url, "--timeout", "10")
    out, _ = await asyncio.wait_for(refused.communicate(), 20)
    assert refused.returncode == 2 and b"401 admin token required" in out
    token = tmp_path / "token"
    token.write_text("t0k\n")
    ok = await watch(
        "c1", "--url", g.sidecar.url, "--token-file", str(token), "--until", "unknown",
        "--timeout", "10",
    )  # fmt: skip
    out, _ = await asyncio.wait_for(ok.communicate(), 20)
    assert ok.returncode == 0 and b"now:" in out


async def test_watch_waits_for_a_conversation_not_observed_yet(gptme) -> None:
    g = await gptme(sidecar_options={"admin_token": "t0k"})
    proc = await watch(
        "later", "--url", g.sidecar.url, "--until", "unknown", "--timeout", "20",
        "--interval", "0.05", env={"SIDECAR_ADMIN_TOKEN": "t0k"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 10)
        waiting = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"no snapshot yet" in waiting
        await g.create("later")
        await eventually(lambda: g.sidecar.snapshot("later") is not None)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0 and b"now:" in out
