"""SIGTERM to a real sidecar process: drain, end streams cleanly, exit 0."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from sidecar.demo.fake import FakeGptme, Outcome

from ..support import SIDECAR, free_port


async def wait_listening(http: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with http.get(url) as resp:
                await resp.read()
                return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listened at {url}")


@pytest.mark.parametrize("fan_out", ["--no-fan-out", "--fan-out"])
async def test_sigterm_drains_in_flight_work_and_exits_zero(serve, fan_out: str) -> None:
    """The client's event stream is a passthrough (fan-out off), or served
    from the sidecar's own subscription (fan-out on, its stream live): either
    way it ends cleanly."""
    # 0.35.1 holds /step until the first token: an in-flight request of ~1 s.
    fake = FakeGptme("0.35.1", outcome=Outcome(start_delay=1.0, tokens=3))
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    port, admin_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        *SIDECAR,
        "--upstream",
        upstream,
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--shutdown-grace",
        "5",
        "--probe-interval",
        "0.1",
        fan_out,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_listening(http, admin + "/healthz")
            async with http.put(base + "/api/v2/conversations/c1", json={"messages": []}) as resp:
                sid = (await resp.json())["session_id"]
            async with http.get(admin + "/readyz") as resp:
                assert resp.status == 200
            if fan_out == "--fan-out":
                # Observed, and its stream live: a client's stream is fanned out.
                for _ in range(100):
                    async with http.get(base + "/api/v2/conversations/c1") as resp:
                        if (await resp.json())["session"]["stream"] == "live":
                            break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the sidecar's stream never went live")
            stream = await http.get(base + f"/api/v2/conversations/c1/events?session_id={sid}")
            first = await asyncio.wait_for(stream.content.readline(), 5)
            if fan_out == "--no-fan-out":
                assert first.startswith(b"data: "), first  # gptme's own bytes
            else:
                assert first.startswith(b"id: "), first  # an id of the sidecar's
            step = asyncio.create_task(
                http.post(base + "/api/v2/conversations/c1/step", json={"session_id": sid})
            )
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with http.get(admin + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["reason"] == "shutting down"
            # The stream ends cleanly: EOF, not a reset.
            rest = await asyncio.wait_for(stream.content.read(), 5)
            assert stream.content.at_eof()
            del rest
            stream.release()
            # The request in flight when the signal came still completes.
            resp = await asyncio.wait_for(step, 5)
            assert resp.status == 200
            resp.release()
        code = await asyncio.wait_for(proc.wait(), 10)
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = (await proc.stdout.read()).decode()
    assert '"event": "stopped"' in out
