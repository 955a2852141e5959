"""A fleet fed garbage by its own Redis, started wrong, and polled across replicas.

Real sidecar processes and a real ``redis-server`` (see test_fleet.py): a
malformed message on the fleet's channel and malformed records never blind a
replica nor answer a 500; a port in use and another upstream's keys stop a
start in one line; a poller that hops replicas gets its 304s.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from sidecar.demo.fake import FakeGptme, Outcome

from ..conftest import Start
from ..support import run
from . import test_fleet
from .test_fleet import Fleet, RedisServer, Replica, _all, _all_live, eventually

# The fleet's fixtures: a real redis-server, and three replicas in front of the fake.
redis_server = test_fleet.redis_server
fleet = test_fleet.fleet


def redis(server: RedisServer, *args: str) -> bytes:
    """One command, spoken by hand (as any client of that Redis could)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode("utf-8", "surrogateescape")
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"".join(parts))
        return sock.recv(4096)


def prefix_of(f: Fleet) -> str:
    args = f.replicas[0].args
    return args[args.index("--store-prefix") + 1]


async def test_a_malformed_message_on_the_channel_blinds_no_replica(
    fleet: Callable[..., Awaitable[Fleet]], redis_server: RedisServer
) -> None:
    f = await fleet(outcome=Outcome(kind="error", error="the model refused: seen by all"))
    a, b, c = f.replicas
    sid = await f.put(a, "blind")
    for replica in f.replicas:
        await f.session(replica, "blind")
    await eventually(lambda: _all_live(f, "blind"), timeout=5)
    channel = prefix_of(f) + "changes"
    for message in (
        "rec\nx\nblind\nNaN\n{}",
        "rec\nevil\nblind\n99\n" + '{"snapshot": {"status": "pwned"}}',
        "touch\nx\nblind\n-1",
        "hb\n\x00",
        "nonsense",
    ):
        redis(redis_server, "PUBLISH", channel, message)
    await asyncio.sleep(1.0)  # a heartbeat or more
    leases = 0
    for replica in f.replicas:
        ready = await replica.ready(f.http)
        assert ready["store"]["degraded"] is None, ready
        leases += ready["store"]["leases"]
    assert leases == 1  # the stream still watched, by one replica
    assert {s["status"] for s in await f.sessions("blind")} != {"pwned"}
    assert await a.metric(f.http, "sidecar_store_rejected_total") >= 1
    # An error sent now still reaches every replica.
    await f.step(c, "blind", sid)
    await eventually(lambda: _all(f, "blind", "failed"), timeout=10)
    for session in await f.sessions("blind"):
        assert session["last_error"] == "the model refused: seen by all"
    assert f.fake.subscriber_count("blind") == 1
    del b


@pytest.mark.parametrize(
    "fields",
    [
        {"rev": "9", "data": '{"snapshot": {"status": "idle"}, "last_event_id": "1\\r\\nX: y"}'},
        {"rev": "9", "data": '{"snapshot": {"status": "failed", "updated_at": "yesterday"}}'},
        {"rev": "9", "data": '{"snapshot": {"status": "failed", "updated_at": 1e20}}'},
        {"rev": "abc", "data": '{"snapshot": {"status": "failed"}}'},
        {"rev": "9", "data": '{"snapshot": {"status": "whatever I like"}}'},
        {"rev": "9", "data": '{"snapshot": {"status": "failed", "last_error": {"an": "object"}}}'},
        {"rev": "9", "data": '{"snapshot": {"status": "failed", "last_error": "' + "x" * 70000},
        {"rev": "9", "data": '{"snapshot": {"status": "idle", "forwarded_at": "soon"}}'},
        {"rev": "9", "data": '{"snapshot": {"status": "idle", "forwarded_by": "a\\r\\nX: y"}}'},
    ],
)
async def test_a_malformed_record_is_dropped_never_served(
    fleet: Callable[..., Awaitable[Fleet]], redis_server: RedisServer, fields: dict[str, str]
) -> None:
    f = await fleet(extra=["--max-event-bytes", "65536"])
    sid = await f.put(f.replicas[0], "garbage")
    for replica in f.replicas:
        await f.session(replica, "garbage")
    await eventually(lambda: _all_live(f, "garbage"), timeout=5)
    args = ["HSET", f"{prefix_of(f)}rec:garbage"]
    for name, value in fields.items():
        args += [name, value]
    redis(redis_server, *args)
    for _ in range(3):
        for session in await f.sessions("garbage"):  # every one a 200 (asserted there)
            assert session["status"] in ("unknown", "idle"), session
            assert not isinstance(session["last_error"], dict)
            assert len(str(session["last_error"])) < 1000
    rejected = 0.0
    for replica in f.replicas:
        rejected += await replica.metric(f.http, "sidecar_store_rejected_total")
    assert rejected >= 1
    # Observed afresh: a step through any replica reads the same everywhere.
    await f.step(f.replicas[2], "garbage", sid)
    await eventually(lambda: _all(f, "garbage", "completed"), timeout=10)
    assert not [m for m, _ in f.fake.requests if m not in ("GET", "PUT", "POST")]


async def test_a_port_in_use_stops_a_redis_replica_in_one_line(
    redis_server: RedisServer,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = await asyncio.to_thread(
            run, "--upstream", "http://127.0.0.1:9", "--port", str(port),
            "--store", redis_server.url, timeout=30,
        )  # fmt: skip
        took = time.monotonic() - started
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot start" in lines[0], done.stderr
    assert took < 10, f"{took:.1f} s"


async def test_keys_made_for_another_upstream_are_refused_unless_adopted(
    redis_server: RedisServer, http: aiohttp.ClientSession, serve: Start
) -> None:
    server = await serve(FakeGptme("0.31.0").app)
    upstream = str(server.make_url("")).rstrip("/")
    first = Replica(upstream, redis_server.url, "owned:", [])
    await first.start(http)
    first.signal(15)
    assert await first.exited(10) == 0
    other = "http://127.0.0.1:9"
    done = await asyncio.to_thread(
        run, "--upstream", other, "--port", "0", "--store", redis_server.url,
        "--store-prefix", "owned:", timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"made for the upstream {upstream}" in lines[0], done.stderr
    adopting = Replica(other, redis_server.url, "owned:", ["--store-adopt"])
    await adopting.start(http)
    try:
        assert (await adopting.ready(http))["store"]["degraded"] is None
    finally:
        adopting.signal(15)
        assert await adopting.exited(10) == 0


async def test_a_poller_hopping_replicas_gets_its_304s(
    fleet: Callable[..., Awaitable[Fleet]],
) -> None:
    f = await fleet(version="0.35.1")
    await f.put(f.replicas[0], "hop")
    for replica in f.replicas:
        await f.session(replica, "hop")
    await eventually(lambda: _all_live(f, "hop"), timeout=5)
    url = "/api/v2/conversations/hop"
    async with f.http.get(f.replicas[0].url + url) as resp:
        tag = resp.headers["ETag"]
    answers = []
    for i in range(12):
        replica = f.replicas[i % 3]
        async with f.http.get(replica.url + url, headers={"If-None-Match": tag}) as resp:
            answers.append(resp.status)
            assert resp.headers["ETag"] == tag
    assert answers == [304] * 12
    # A content event anywhere: the tag is stale on every replica.
    async with f.http.post(
        f.replicas[1].url + url, json={"role": "user", "content": "more"}
    ) as resp:
        assert resp.status == 200

    async def stale_everywhere() -> bool:
        for replica in f.replicas:
            async with f.http.get(replica.url + url, headers={"If-None-Match": tag}) as resp:
                if resp.status != 200:
                    return False
        return True

    await eventually(stale_everywhere, timeout=5)
