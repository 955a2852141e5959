"""Webhooks on transitions: signed, in order, retried, bounded, and never in the way."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from sidecar.app import WEBHOOKS
from sidecar.demo.fake import Outcome

from ..conftest import eventually

FAST = {"webhook_retry_min": 0.05, "webhook_retry_max": 0.2}


async def failing_step(g, cid: str) -> None:
    sid = await g.create(cid)
    await g.step(cid, sid)
    await g.wait_status(cid, "failed")


async def test_each_transition_to_a_listed_status_is_posted_signed_in_order(
    gptme, hook, secret_file: Path
) -> None:
    h = await hook()
    receiver = h.receiver(secret_file, "ops", statuses=["starting", "failed", "completed"])
    g = await gptme(outcome=Outcome(kind="error"), sidecar_options={"webhooks": (receiver,)})
    await failing_step(g, "c1")
    single = await g.session("c1")
    await eventually(lambda: len(h.bodies("c1")) == 2)
    starting, failed = h.bodies("c1")
    assert (starting["type"], failed["type"]) == ("conversation.starting", "conversation.failed")
    assert failed["data"]["previous_status"] == "generating"  # generating itself is not listed
    assert failed["data"]["snapshot"]["last_error"] == single["last_error"]
    assert failed["data"]["snapshot"]["status"] == single["status"]
    assert starting["data"]["version"] < failed["data"]["version"]
    assert starting["id"] != failed["id"]
    assert all(t["user-agent"].startswith("sidecar/") for t in h.tries)


async def test_statuses_no_receiver_asked_for_post_nothing(gptme, hook, secret_file: Path) -> None:
    h = await hook()
    receiver = h.receiver(secret_file, "ops", statuses=["completed"])
    g = await gptme(outcome=Outcome(kind="error"), sidecar_options={"webhooks": (receiver,)})
    await failing_step(g, "c1")
    await asyncio.sleep(0.3)
    assert h.tries == []


async def test_a_receiver_answering_5xx_gets_the_same_webhook_again_until_it_takes_it(
    gptme, hook, secret_file: Path
) -> None:
    h = await hook(answers=[503, 500, 502])
    receiver = h.receiver(secret_file, "ops", statuses=["failed"])
    g = await gptme(
        outcome=Outcome(kind="error"), sidecar_options={"webhooks": (receiver,), **FAST}
    )
    await failing_step(g, "c1")
    await eventually(lambda: len(h.got) == 1, timeout=10)
    assert len(h.tries) == 4
    assert len({t["webhook-id"] for t in h.tries}) == 1  # the same message, four times
    courier = g.sidecar.server.app[WEBHOOKS].couriers["ops"]
    assert courier.attempts == {"5xx": 3, "2xx": 1}
    assert courier.results["delivered"] == 1


async def test_a_slow_receiver_holds_neither_the_proxy_nor_another_receiver(
    gptme, hook, secret_file: Path
) -> None:
    slow, quick = await hook(delay=30), await hook()
    receivers = (
        slow.receiver(secret_file, "slow", statuses=["failed"]),
        quick.receiver(secret_file, "quick", statuses=["failed"]),
    )
    g = await gptme(
        outcome=Outcome(kind="error"),
        sidecar_options={"webhooks": receivers, "webhook_timeout": 20.0},
    )
    for cid in ("c1", "c2", "c3"):
        await failing_step(g, cid)  # each GET answered while the slow one hangs
    await eventually(lambda: len(quick.got) == 3, timeout=5)
    assert len(slow.tries) == 1 and slow.got == []  # still in its first attempt
    state = g.sidecar.server.app[WEBHOOKS].state()
    slow_state = next(r for r in state["receivers"] if r["name"] == "slow")
    assert slow_state["pending"] == 3 and slow_state["in_hand"]["attempts"] == 0


async def test_a_webhook_older_than_max_age_is_dropped_counted_and_said(
    gptme, secret_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar.webhooks.receivers import parse_receivers

    # Nothing listens there: every attempt is refused.
    receiver = parse_receivers(
        [{"url": "http://127.0.0.1:9/hook", "secret_file": str(secret_file), "name": "gone"}],
        "t",
    )[0]
    options = {"webhooks": (receiver,), "webhook_max_age": 0.5, **FAST}
    g = await gptme(outcome=Outcome(kind="error"), sidecar_options=options)
    with caplog.at_level(logging.WARNING, logger="sidecar.webhooks"):
        await failing_step(g, "c1")
        courier = g.sidecar.server.app[WEBHOOKS].couriers["gone"]
        await eventually(lambda: courier.results["expired"] == 1, timeout=5)
    assert courier.attempts["error"] >= 2
    assert any("webhook_max_age" in r.getMessage() for r in caplog.records)


async def test_a_full_outbox_refuses_new_webhooks_counts_them_and_warns(
    gptme, hook, secret_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = await hook(delay=30)  # holds the first; the rest wait
    receiver = h.receiver(secret_file, "ops", statuses=["starting", "failed"])
    options = {"webhooks": (receiver,), "webhook_outbox_max": 2}
    g = await gptme(outcome=Outcome(kind="error"), sidecar_options=options)
    with caplog.at_level(logging.WARNING, logger="sidecar.webhooks"):
        for cid in ("c1", "c2"):
            await failing_step(g, cid)  # four transitions for a queue of two
    webhooks = g.sidecar.server.app[WEBHOOKS]
    assert webhooks.outbox.dropped[("ops", "refused")] == 2
    assert webhooks.outbox.count("ops") == 2
    assert any("outbox full" in r.getMessage() for r in caplog.records)


async def test_metrics_and_the_state_api_show_each_receiver(
    gptme, hook, secret_file: Path, http: aiohttp.ClientSession
) -> None:
    h = await hook(answers=[503] * 1000)  # never takes it
    receiver = h.receiver(secret_file, "ops", statuses=["failed"])
    g = await gptme(
        outcome=Outcome(kind="error"),
        sidecar_options={"webhooks": (receiver,), "admin_token": "t0k", **FAST},
    )
    await failing_step(g, "c1")
    await eventually(lambda: len(h.tries) >= 2, timeout=5)
    auth = {"Authorization": "Bearer t0k"}
    async with http.get(g.url("/_sidecar/webhooks"), headers=auth) as resp:
        state = await resp.json()
    (ops,) = state["receivers"]
    assert ops["pending"] == 1 and ops["queue"][0]["conversation"] == "c1"
    assert ops["in_hand"]["last_result"] == "5xx" and ops["in_hand"]["last_error"] == "HTTP 503"
    assert ops["url"] == h.url and state["outbox"] == {"kind": "memory", "degraded": None}
    async with http.get(g.url("/_sidecar/metrics"), headers=auth) as resp:
        text = await resp.text()
    assert 'sidecar_webhook_pending{receiver="ops"} 1.0' in text
    assert 'sidecar_webhook_deliveries_total{receiver="ops",result="delivered"} 0.0' in text
    assert 'sidecar_webhook_attempts_total{outcome="5xx",receiver="ops"}' in text
    async with http.get(g.url("/_sidecar/webhooks")) as resp:
        assert resp.status == 401  # as closed as the rest of the state API


async def test_the_sqlite_outbox_delivers_after_a_restart_with_the_same_ids(
    serve, start_sidecar, hook, secret_file: Path, tmp_path: Path
) -> None:
    from sidecar.demo.fake import FakeGptme

    h = await hook(answers=[503] * 1000)
    receiver = h.receiver(secret_file, "ops", statuses=["failed"])
    fake = FakeGptme(outcome=Outcome(kind="error"))
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    store = f"sqlite:{tmp_path / 'state.db'}"
    options = {"webhooks": (receiver,), "store": store, **FAST}
    first = await start_sidecar(upstream, **options)
    async with aiohttp.ClientSession() as http:
        async with http.put(
            f"{first.url}/api/v2/conversations/c1",
            json={"prompt": "p", "messages": [{"role": "user", "content": "hi"}]},
        ) as resp:
            sid = (await resp.json())["session_id"]
        async with http.post(f"{first.url}/api/v2/conversations/c1/step", json={"session_id": sid}):
            pass
    await eventually(lambda: len(h.tries) >= 1, timeout=5)
    await first.server.stop(grace=1.0)
    sent = h.tries[0]["webhook-id"]
    h.answers.clear()  # the receiver is fixed
    second = await start_sidecar(upstream, **options)
    await eventually(lambda: len(h.got) == 1, timeout=5)
    assert h.got[0]["id"] == sent  # the same message, not a new one
    assert second.server.app[WEBHOOKS].outbox.count("ops") == 0


async def test_an_unreadable_entry_in_the_file_is_dropped_never_sent(
    serve, start_sidecar, hook, secret_file: Path, tmp_path: Path
) -> None:
    import sqlite3

    from sidecar.demo.fake import FakeGptme
    from sidecar.webhooks.outbox import Entry

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE webhook_outbox (seq INTEGER PRIMARY KEY, receiver TEXT NOT NULL,"
        " entry BLOB NOT NULL)"
    )
    good = Entry(
        "msg_" + "a" * 32, "c1", "failed", time.time(), orjson.dumps({"type": "x", "data": {}})
    )
    rows = [
        (1, "ops", b"not json"),
        (2, "ops", orjson.dumps({"v": 1, "id": "nope", "conversation": "c", "status": "x"})),
        (3, "ops", good.dumps()),
        (4, "ops", b"x" * (9 * 1024 * 1024)),
    ]
    db.executemany("INSERT INTO webhook_outbox VALUES (?, ?, ?)", rows)
    db.commit()
    db.close()
    h = await hook(check=False)
    receiver = h.receiver(secret_file, "ops")
    fake = FakeGptme()
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    sc = await start_sidecar(upstream, webhooks=(receiver,), store=f"sqlite:{path}")
    await eventually(lambda: len(h.tries) == 1, timeout=5)
    assert h.tries[0]["webhook-id"] == good.id
    assert sc.server.app[WEBHOOKS].outbox.dropped[("ops", "invalid")] == 3
