"""The built-in demo: the silent failure, before and after.

A fake gptme 0.31.0 whose model key is invalid runs on loopback, with the
sidecar in front. A scripted polling client starts one step directly and one
through the sidecar, then polls both the way a REST-only client would. Direct,
the conversation never changes and nothing says why; through the sidecar, the
poller reads ``session.status == "failed"`` and the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import aiohttp
from aiohttp import web

from ..config import Settings
from ..server import Server
from .fake import FakeGptme, Outcome

__all__ = ["run_demo"]

POLLS = 6
POLL_INTERVAL = 0.5


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    return runner, server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]


def _direct_view(body: dict[str, Any], before: int) -> str:
    grown = len(body.get("log", [])) > before
    if grown:
        return "a reply arrived"
    return f"{len(body.get('log', []))} message(s), no error: still working?"


def _sidecar_view(body: dict[str, Any]) -> str:
    s = body.get("session", {})
    text = f"status={s.get('status')} generating={str(s.get('generating')).lower()}"
    if s.get("last_error"):
        error = s["last_error"]
        text += f' last_error="{error[:38]}..."' if len(error) > 38 else f' last_error="{error}"'
    return text


async def _start_step(http: aiohttp.ClientSession, base: str, cid: str) -> int:
    created = await (
        await http.put(
            f"{base}/api/v2/conversations/{cid}",
            json={"prompt": "demo", "messages": [{"role": "user", "content": "Say hello."}]},
        )
    ).json()
    step = await http.post(
        f"{base}/api/v2/conversations/{cid}/step", json={"session_id": created["session_id"]}
    )
    return step.status


async def run_demo(host: str = "127.0.0.1", port: int = 0, serve: bool = False) -> int:
    out = sys.stdout
    fake = FakeGptme("0.31.0", outcome=Outcome(kind="error", start_delay=0.2, pace=0.05))
    upstream_runner, upstream_port = await _start(fake.app, host, 0)
    upstream = f"http://{host}:{upstream_port}"
    settings = Settings(upstream=upstream, host=host, port=port, log_level="warning")
    sidecar_server = Server(settings)  # as `sidecar --upstream` runs it
    await sidecar_server.start()
    sidecar = f"http://{host}:{sidecar_server.port}"
    print("sidecar demo: a stream-first upstream whose model call fails", file=out)
    print(f"  upstream (fake gptme 0.31.0) listens on {upstream}", file=out)
    print(f"  sidecar in front of it      listens on {sidecar}\n", file=out)
    try:
        async with aiohttp.ClientSession() as http:
            direct_status = await _start_step(http, upstream, "demo-direct")
            via_status = await _start_step(http, sidecar, "demo-sidecar")
            print(
                f"POST .../step answered {direct_status} direct, {via_status} via sidecar.",
                file=out,
            )
            print("Now a REST-only client polls GET /api/v2/conversations/{id}:\n", file=out)
            print(f"{'t':>5}  {'direct to the upstream':<42} through the sidecar", file=out)
            final: dict[str, Any] = {}
            for i in range(POLLS):
                direct = await (
                    await http.get(f"{upstream}/api/v2/conversations/demo-direct")
                ).json()
                final = await (
                    await http.get(f"{sidecar}/api/v2/conversations/demo-sidecar")
                ).json()
                seen = f"{_direct_view(direct, 1):<42} {_sidecar_view(final)}"
                print(f"{i * POLL_INTERVAL:>4.1f}s  {seen}", file=out)
                await asyncio.sleep(POLL_INTERVAL)
            session = final.get("session", {})
            print("", file=out)
            if session.get("status") == "failed":
                print(
                    "Direct, the poller spins forever: the error went out on a stream nobody read.",
                    file=out,
                )
                print("Through the sidecar it reads the failure as state:", file=out)
                print(f"  session.last_error = {session.get('last_error')!r}", file=out)
                ok = True
            else:
                print(f"Unexpected: the sidecar reported {session!r}", file=out)
                ok = False
        if serve:
            print("\nBoth servers stay up; try them, then press Ctrl-C to stop:", file=out)
            print(f"  curl -s {upstream}/api/v2/conversations/demo-direct", file=out)
            print(f"  curl -s {sidecar}/api/v2/conversations/demo-sidecar", file=out)
            print(f"  open {sidecar}/_sidecar/ for the status page", file=out)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        else:
            print(
                "\nRun `sidecar demo --serve` to keep both servers up and try them with curl.",
                file=out,
            )
        return 0 if ok else 1
    finally:
        await sidecar_server.stop(grace=1.0)
        await upstream_runner.cleanup()
