"""A fleet's list: each replica shows what any replica observed (the shared copies)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sidecar.demo.fake import Outcome

from .test_fleet import Fleet, eventually, fleet, redis_server

__all__ = ["fleet", "redis_server"]  # the fixtures, shared with test_fleet


async def test_a_list_on_any_replica_shows_what_another_observed(
    fleet: Callable[..., Awaitable[Fleet]],
) -> None:
    f = await fleet(outcome=Outcome(kind="error"))
    a, b, c = f.replicas
    sid = await f.put(a, "seen-on-a")  # only replica a has served it
    await f.step(a, "seen-on-a", sid)

    async def failed_in_b_list() -> bool:
        async with f.http.get(f"{b.url}/api/v2/conversations") as resp:
            items = {item["id"]: item for item in await resp.json()}
            enriched = resp.headers["Sidecar-Enriched"]
        state = items["seen-on-a"].get("session") or {}
        return enriched == "1" and state.get("status") == "failed"

    await eventually(failed_in_b_list, timeout=10)
    single = await f.session(a, "seen-on-a")
    async with f.http.get(f"{c.url}/api/v2/conversations") as resp:
        listed = (await resp.json())[0]["session"]
    assert (listed["status"], listed["last_error"]) == (single["status"], single["last_error"])
    assert f.fake.subscriber_count("seen-on-a") == 1  # listing elsewhere opened no stream
