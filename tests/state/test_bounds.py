"""Bounded memory: caps on streams and snapshots, least recently used first."""

from __future__ import annotations

import logging

from sidecar.demo.fake import Outcome

from ..conftest import eventually


async def test_the_subscription_cap_closes_the_oldest_idle_stream_never_work_in_flight(
    gptme,
) -> None:
    g = await gptme(
        "0.31.0",
        outcome=Outcome(tokens=10_000, pace=0.01),
        sidecar_options={"max_subscriptions": 2},
    )
    sid = await g.create("busy")
    await g.step("busy", sid)  # oldest, but with a step in flight
    await g.wait_status("busy", "generating")
    await g.create("idle")
    await g.get("idle")
    await g.create("new")
    await g.get("new")  # a third stream: one must go
    reg = g.sidecar.registry
    assert sorted(s.key for s in reg.subscriptions) == ["busy", "new"]
    # The closed one keeps its snapshot, and says its stream is gone.
    assert reg.get("idle") is not None and reg.get("idle").snapshot.stream == "lost"
    assert (await g.session("busy"))["status"] == "generating"


async def test_a_closed_stream_keeps_its_last_error_until_the_snapshot_cap_evicts_it(gptme) -> None:
    g = await gptme(
        "0.31.0",
        outcome=Outcome(kind="error"),
        sidecar_options={"max_subscriptions": 1, "max_snapshots": 2},
    )
    sid = await g.create("failed")
    await g.step("failed", sid)
    await g.wait_status("failed", "failed")
    await g.create("second")
    await g.get("second")  # takes the only stream
    reg = g.sidecar.registry
    assert reg.get("failed").snapshot.last_error is not None
    assert reg.get("failed").snapshot.stream == "lost"
    await g.create("third")
    await g.get("third")  # a third snapshot: the least recently used goes
    assert reg.get("failed") is None
    assert sorted(c.id for c in reg.conversations()) == ["second", "third"]


async def test_credentials_never_reach_the_logs(gptme, http, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    g = await gptme("0.35.1", token="very-secret-token", outcome=Outcome(kind="error"))
    async with http.get(
        g.url("/api/v2/conversations/c1"), headers={"Authorization": "Bearer wrong-secret"}
    ) as resp:
        assert resp.status == 401
    g.headers = {"Authorization": "Bearer very-secret-token", "Cookie": "session=cookie-secret"}
    sid = await g.create("c2")
    await g.step("c2", sid)
    await g.wait_status("c2", "failed")
    g.fake.drop_streams()  # reconnects log their reasons
    await eventually(lambda: g.sidecar.snapshot("c2").stream == "live")
    logged = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    for secret in ("very-secret-token", "wrong-secret", "cookie-secret"):
        assert secret not in logged
