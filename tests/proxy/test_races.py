"""The trigger's answer and the step's events, arriving in either order."""

from __future__ import annotations

import asyncio

from sidecar.demo.fake import Outcome


async def test_events_before_the_answer_are_not_overwritten(gptme) -> None:
    # 0.35.1 answers /step only after the first token; here the whole step
    # (3 fast tokens) completes before the answer is relayed.
    g = await gptme("0.35.1", outcome=Outcome(tokens=1, pace=0.0))
    sid = await g.create("c1")
    resp = await g.step("c1", sid)
    assert resp.status == 200
    session = await g.wait_status("c1", "completed", timeout=2)
    await asyncio.sleep(0.1)
    assert (await g.session("c1"))["status"] == "completed"
    assert session["generating"] is False


async def test_answer_before_events_shows_starting_then_the_outcome(gptme) -> None:
    # 0.31.0 answers at once; generation_started comes 0.3 s later.
    g = await gptme("0.31.0", outcome=Outcome(kind="error", start_delay=0.3))
    sid = await g.create("c1")
    await g.step("c1", sid)
    session = await g.session("c1")
    assert (session["status"], session["generating"]) == ("starting", True)
    await g.wait_status("c1", "failed")


async def test_an_early_error_answered_with_500_is_state(gptme) -> None:
    g = await gptme("0.35.1", outcome=Outcome(kind="error", error_after=0))
    sid = await g.create("c1")
    resp = await g.step("c1", sid)
    assert resp.status == 500
    session = await g.wait_status("c1", "failed")
    assert session["last_error"].startswith("Error code: 401")


async def test_the_session_id_of_the_step_is_reported_when_the_upstream_has_none(gptme) -> None:
    g = await gptme("0.31.0", outcome=Outcome(kind="error"))
    sid = await g.create("c1")
    await g.step("c1", sid)
    assert (await g.session("c1"))["id"] == sid
