"""Shutdown under faults: bounded by shutdown_grace, and a second signal ends it at once.

A real sidecar process whose shutdown is held up by a request the upstream
never answers: it still exits within ``shutdown_grace`` of SIGTERM, and a
second SIGTERM (or SIGINT) ends it at once with a non-zero code, as uvicorn
and gunicorn do.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from ..conftest import Start
from ..support import free_port


async def _never_answering(serve: Start) -> str:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hang)
    server = await serve(app)
    return str(server.make_url("")).rstrip("/")


@contextlib.asynccontextmanager
async def held_up(upstream: str, *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A sidecar with a request in flight that will never finish; killed at the end."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "--upstream", upstream, "--port", str(port),
        "--store", "memory", "--response-timeout", "3600", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    http = aiohttp.ClientSession()
    pending: asyncio.Task[object] | None = None
    try:
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/_sidecar/healthz") as resp:
                    if resp.status == 200:
                        break
            await asyncio.sleep(0.03)
        pending = asyncio.create_task(http.get(f"http://127.0.0.1:{port}/slow"))
        await asyncio.sleep(0.5)  # in flight
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await http.close()


async def test_a_shutdown_held_up_by_a_request_ends_within_the_grace(serve: Start) -> None:
    upstream = await _never_answering(serve)
    async with held_up(upstream, "--shutdown-grace", "2") as proc:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        took = time.monotonic() - started
    assert took < 2 + 1.0, f"exited {took:.1f} s after SIGTERM"


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_ends_the_process_at_once(serve: Start, second: int) -> None:
    upstream = await _never_answering(serve)
    async with held_up(upstream, "--shutdown-grace", "30") as proc:
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert proc.returncode is None  # draining: the grace is 30 s
        started = time.monotonic()
        proc.send_signal(second)
        code = await asyncio.wait_for(proc.wait(), 10)
        took = time.monotonic() - started
    assert code == 128 + second
    assert took < 2, f"{took:.1f} s"
    assert proc.stdout is not None
    out = (await proc.stdout.read()).decode()
    assert "second signal: exiting now" in out
