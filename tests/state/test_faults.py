"""Upstream faults: the snapshot says what happened, and never claims work it cannot see."""

from __future__ import annotations

import asyncio

from sidecar.demo.fake import Outcome

from ..conftest import eventually

FAST = {"stale_after": 0.6, "confirm_timeout": 0.5, "start_timeout": 0.5}


async def generating(gptme, **fake_options):
    """A fake gptme 0.31.0 with the sidecar in front, a long step under way."""
    g = await gptme(
        "0.31.0", outcome=Outcome(tokens=10_000, pace=0.01), sidecar_options=FAST, **fake_options
    )
    sid = await g.create("c1")
    assert (await g.step("c1", sid)).status == 200
    await g.wait_status("c1", "generating")
    return g


async def test_killed_mid_generation_and_restarted_ends_the_step_as_failed(gptme, serve) -> None:
    g = await generating(gptme, heartbeat=0.2)
    port = g.server.port  # gone from the server object once it is closed
    g.fake.restart()  # the process dies: sessions and the running step are gone
    await g.server.close()
    await eventually(lambda: g.sidecar.snapshot("c1").stream in ("reconnecting", "connecting"))
    assert g.sidecar.snapshot("c1").generating is True  # not yet known to be dead
    await serve(g.fake.app, port=port)  # back, with the log but no sessions
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    snap = await eventually(
        lambda: g.sidecar.snapshot("c1").status == "failed" and g.sidecar.snapshot("c1")
    )
    assert "lost mid-step" in snap.last_error
    assert snap.generating is False


async def test_a_stream_dropped_while_work_goes_on_is_not_failed(gptme) -> None:
    g = await gptme(
        "0.31.0", heartbeat=0.2, outcome=Outcome(tokens=300, pace=0.01), sidecar_options=FAST
    )
    sid = await g.create("c1")
    await g.step("c1", sid)
    await g.wait_status("c1", "generating")
    g.fake.drop_streams()
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "reconnecting")
    await eventually(lambda: g.sidecar.snapshot("c1").stream == "live")
    await asyncio.sleep(FAST["confirm_timeout"] + 0.2)
    assert g.sidecar.snapshot("c1").status == "generating"  # tokens kept coming
    await g.wait_status("c1", "completed", timeout=10)


async def test_an_upstream_that_stays_down_ends_the_step(gptme) -> None:
    g = await generating(gptme)
    g.fake.restart()
    await g.server.close()
    snap = await eventually(
        lambda: g.sidecar.snapshot("c1").status == "failed" and g.sidecar.snapshot("c1"), timeout=5
    )
    assert "did not come back" in snap.last_error
    assert snap.stream == "reconnecting"


async def test_a_step_that_shows_no_event_is_reported(gptme) -> None:
    g = await gptme("0.31.0", outcome=Outcome(start_delay=30), sidecar_options=FAST)
    sid = await g.create("c1")
    await g.step("c1", sid)
    assert (await g.session("c1"))["status"] == "starting"
    session = await g.wait_status("c1", "failed", timeout=3)
    assert "no event from the upstream within 0.5 s" in session["last_error"]


async def test_a_half_open_stream_is_detected_within_three_heartbeats(gptme) -> None:
    heartbeat = 0.2
    g = await gptme("0.31.0", heartbeat=heartbeat)  # stale_after defaults to 3 heartbeats
    g.sidecar.registry.stale_after = 3 * heartbeat
    await g.create("c1")
    await g.session("c1")
    sub = await eventually(lambda: g.sidecar.registry.get("c1").subscription)
    await eventually(lambda: sub.live)
    g.fake.go_silent()
    loop = asyncio.get_running_loop()
    silent_at = loop.time()
    await eventually(lambda: sub.stream == "reconnecting", timeout=5)
    assert loop.time() - silent_at <= 3 * heartbeat + 2 * heartbeat  # 3 beats, plus one in flight
