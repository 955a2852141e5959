"""Webhooks between real processes: a receiver verifying with ``standardwebhooks``,
sidecars that are killed, a receiver that is down, three replicas on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.demo.fake import FakeGptme, Outcome

from ..conftest import Start
from ..state.test_fleet import Fleet, Replica, eventually, fleet, redis_server
from ..support import free_port
from .conftest import payloads
from .receiver import ReceiverProcess

__all__ = ["fleet", "redis_server"]  # the fleet's fixtures, shared with test_fleet

RETRY = ["--webhook-retry-min", "0.2", "--webhook-retry-max", "1"]


def webhook_args(receiver: ReceiverProcess, statuses: str) -> list[str]:
    return [
        "--webhook-url", receiver.url, "--webhook-secret-file", str(receiver.secret_file),
        "--webhook-statuses", statuses, *RETRY,
    ]  # fmt: skip


@pytest.fixture
async def sidecars(http: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    """Sidecar processes with a store of their own (each stopped at the end)."""
    started: list[Replica] = []

    async def start(upstream: str, store: str, extra: list[str]) -> Replica:
        replica = Replica(upstream, store, f"w{os.getpid()}-{free_port()}:", extra)
        await replica.start(http)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        if replica.proc is not None and replica.proc.returncode is None:
            replica.signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(replica.proc.wait(), 30)


async def upstream_of(serve: Start, **fake: Any) -> tuple[FakeGptme, str]:
    made = FakeGptme("0.31.0", **fake)
    return made, str((await serve(made.app)).make_url("")).rstrip("/")


async def steps(http: aiohttp.ClientSession, base: str, cid: str, count: int) -> None:
    """Create a conversation and run ``count`` steps on it, one after the other."""
    url = f"{base}/api/v2/conversations/{cid}"
    body = {"prompt": "p", "messages": [{"role": "user", "content": "hello"}]}
    async with http.put(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        sid = (await resp.json())["session_id"]
    for _ in range(count):
        async with http.post(url + "/step", json={"session_id": sid}) as resp:
            assert resp.status == 200, await resp.text()
        for _ in range(500):
            async with http.get(url) as resp:
                if (await resp.json())["session"]["status"] in ("failed", "completed"):
                    break
            await asyncio.sleep(0.02)


async def pending(http: aiohttp.ClientSession, replica: Replica) -> list[str]:
    async with http.get(f"http://127.0.0.1:{replica.admin_port}/_sidecar/webhooks") as resp:
        assert resp.status == 200, await resp.text()
        (receiver,) = (await resp.json())["receivers"]
    return [item["webhook_id"] for item in receiver["queue"]]


def in_order(delivered: list[dict[str, Any]], conversation: str) -> list[int]:
    return [d["data"]["version"] for d in delivered if d["data"]["conversation_id"] == conversation]


async def test_a_receiver_down_for_10_s_gets_everything_after_in_order_per_conversation(
    serve: Start,
    sidecars: Callable[..., Awaitable[Replica]],
    receiver_process: Callable[..., ReceiverProcess],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, upstream = await upstream_of(serve, outcome=Outcome(kind="error"))
    receiver = receiver_process()  # not started: down
    sc = await sidecars(
        upstream, f"sqlite:{tmp_path / 'state.db'}", webhook_args(receiver, "generating,failed")
    )
    loop = asyncio.get_running_loop()
    down_since = loop.time()
    await asyncio.gather(*(steps(http, sc.url, cid, 3) for cid in ("c1", "c2")))
    waiting = await pending(http, sc)
    assert len(waiting) == 12  # 2 conversations, 3 steps, 2 transitions each
    await asyncio.sleep(max(0.0, 10.0 - (loop.time() - down_since)))
    receiver.start()
    await eventually(lambda: len(payloads(receiver.deliveries())) == 12, timeout=15)
    delivered = payloads(receiver.deliveries())
    assert [d["id"] for d in delivered if d["id"] in waiting] == waiting  # the queue's order
    for cid in ("c1", "c2"):
        versions = in_order(delivered, cid)
        assert versions == sorted(versions) and len(set(versions)) == 6, versions
        types = [d["type"] for d in delivered if d["data"]["conversation_id"] == cid]
        assert types == ["conversation.generating", "conversation.failed"] * 3
    assert await pending(http, sc) == []


async def test_a_sidecar_killed_with_deliveries_pending_delivers_them_after_restart(
    serve: Start,
    sidecars: Callable[..., Awaitable[Replica]],
    receiver_process: Callable[..., ReceiverProcess],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, upstream = await upstream_of(serve, outcome=Outcome(kind="error"))
    receiver = receiver_process()  # down while the transitions happen
    store = f"sqlite:{tmp_path / 'state.db'}"
    args = webhook_args(receiver, "failed")
    first = await sidecars(upstream, store, args)
    await asyncio.gather(*(steps(http, first.url, f"k{i}", 1) for i in range(5)))
    waiting = await pending(http, first)
    assert len(waiting) == 5
    await asyncio.sleep(0.3)  # (what was put a moment ago is written by now)
    first.signal(signal.SIGKILL)
    assert first.proc is not None
    await first.proc.wait()
    receiver.start()
    second = await sidecars(upstream, store, args)
    await eventually(lambda: len(payloads(receiver.deliveries())) == 5, timeout=15)
    assert [d["id"] for d in payloads(receiver.deliveries())] == waiting  # none lost, none new
    assert await pending(http, second) == []


async def test_three_replicas_deliver_each_transition_once(
    fleet: Callable[..., Awaitable[Fleet]],
    receiver_process: Callable[..., ReceiverProcess],
    http: aiohttp.ClientSession,
) -> None:
    receiver = receiver_process()
    receiver.start()
    f = await fleet(
        count=3, extra=webhook_args(receiver, "failed,completed"), outcome=Outcome(kind="error")
    )
    for i, replica in enumerate([*f.replicas, *f.replicas]):
        await steps(http, replica.url, f"r{i}", 2)  # two failures each, on every replica
    await eventually(lambda: len(payloads(receiver.deliveries())) == 12, timeout=15)
    await asyncio.sleep(1.0)  # nothing more comes
    deliveries = receiver.deliveries()
    ids = [{k.lower(): v for k, v in d["headers"].items()}["webhook-id"] for d in deliveries]
    assert len(ids) == len(set(ids)) == 12, "a webhook was sent twice"
    delivered = [
        await r.metric(
            http,
            'sidecar_webhook_deliveries_total{receiver="'
            + _name(receiver)
            + '",result="delivered"}',
        )
        for r in f.replicas
    ]
    assert sum(delivered) == 12 and sorted(delivered)[:2] == [0, 0], delivered  # one replica sent
    for i in range(6):
        versions = in_order(payloads(deliveries), f"r{i}")
        assert len(versions) == 2 and versions[0] < versions[1]


def _name(receiver: ReceiverProcess) -> str:
    return f"127.0.0.1-{receiver.port}-hooks-sidecar"
