"""``sidecar check``: does this upstream work with this profile? Plain answers.

It changes nothing upstream: it reads the health path, finds an existing
resource (``--id``, or the first one the profile's list path returns), opens
its event stream for a few seconds, and shows what the sidecar would merge.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, TextIO

import aiohttp
import orjson

from ..config import Settings
from ..core.events import Reader
from ..core.merge import merge
from ..core.profile import Profile
from ..core.snapshot import Snapshot
from ..core.sse import EventDecoder

__all__ = ["run_check"]


class Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = False

    def ok(self, text: str) -> None:
        print(f"  ok    {text}", file=self.out)

    def bad(self, text: str) -> None:
        self.failed = True
        print(f"  FAIL  {text}", file=self.out)

    def note(self, text: str) -> None:
        print(f"        {text}", file=self.out)


async def run_check(
    settings: Settings,
    profile: Profile,
    out: TextIO,
    resource_id: str | None = None,
    seconds: float = 5.0,
) -> int:
    report = Report(out)
    headers = {}
    if settings.upstream_authorization:
        headers["Authorization"] = settings.upstream_authorization
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout)
    print(
        f"Checking {settings.upstream} with the {profile.name} profile ({profile.source})", file=out
    )
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        if not await _health(http, settings, profile, report):
            return 1
        if resource_id is None:
            resource_id = await _first_resource(http, settings, profile, report)
        if resource_id is None:
            return 1
        if not profile.valid_id(resource_id):
            report.bad(f"{resource_id!r} does not match the profile's id pattern")
            return 1
        snap = await _stream(http, settings, profile, resource_id, seconds, report)
        await _enrich(http, settings, profile, resource_id, snap, report)
    print("All good." if not report.failed else "Some checks failed.", file=out)
    return 1 if report.failed else 0


async def _health(
    http: aiohttp.ClientSession, settings: Settings, profile: Profile, report: Report
) -> bool:
    url = settings.upstream + profile.health_path
    started = time.perf_counter()
    try:
        async with http.get(url, allow_redirects=False) as resp:
            await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        report.bad(f"cannot reach the upstream at {url}: {type(exc).__name__}: {exc}")
        return False
    took = (time.perf_counter() - started) * 1000
    report.ok(f"the upstream answers: GET {profile.health_path} -> {resp.status} in {took:.0f} ms")
    if resp.status in (401, 403):
        report.note("it wants credentials: give --upstream-authorization 'Bearer <token>'")
    return True


async def _first_resource(
    http: aiohttp.ClientSession, settings: Settings, profile: Profile, report: Report
) -> str | None:
    if profile.list_path is None:
        report.bad("the profile has no list path: give --id of an existing resource")
        return None
    async with http.get(settings.upstream + profile.list_path) as resp:
        body = await resp.read()
        if resp.status != 200:
            report.bad(f"GET {profile.list_path} -> {resp.status}: {body[:200]!r}")
            return None
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError:
        report.bad(f"GET {profile.list_path} did not answer JSON")
        return None
    if isinstance(items, dict):  # some servers wrap the list
        items = next((v for v in items.values() if isinstance(v, list)), [])
    ids = (
        [
            str(item.get(profile.list_id_field))
            for item in items
            if isinstance(item, dict) and item.get(profile.list_id_field)
        ]
        if isinstance(items, list)
        else []
    )
    if not ids:
        report.bad(f"GET {profile.list_path} lists no resource: create one, or give --id")
        return None
    report.ok(f"found {len(ids)} resource(s); checking {ids[0]!r}")
    return ids[0]


async def _stream(
    http: aiohttp.ClientSession,
    settings: Settings,
    profile: Profile,
    resource_id: str,
    seconds: float,
    report: Report,
) -> Snapshot:
    path = profile.stream.build(resource_id) if profile.stream.has_id else profile.stream.template
    decoder = EventDecoder(settings.max_event_bytes)
    events = Reader(profile)  # the registry's own reading of events
    seen: Counter[str] = Counter()
    tokens: set[str] = set()  # what `if_seen` conditions see on this connection
    malformed = 0
    snap = Snapshot()
    states = [snap.status]  # the status as events arrived, as the registry would have it
    try:
        async with http.get(
            settings.upstream + path, headers={"Accept": "text/event-stream"}
        ) as resp:
            if resp.status == 404:
                report.bad(f"GET {path} -> not found (404): no such resource, or not this path")
                return snap
            if resp.status != 200:
                report.bad(f"GET {path} -> {resp.status}: the upstream refused the stream")
                return snap
            if resp.content_type != "text/event-stream":
                report.bad(f"GET {path} -> {resp.content_type}: not an event stream")
                return snap
            report.ok(f"GET {path} is an event stream; listening for {seconds:g} s")
            deadline = asyncio.get_running_loop().time() + seconds
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    chunk = await asyncio.wait_for(resp.content.readany(), left)
                except TimeoutError:
                    break
                if not chunk:
                    break
                for sse in decoder.feed(chunk):
                    event = events.read(sse)
                    if event is None:
                        malformed += 1
                        continue
                    seen[event.type] += 1
                    tokens.update(events.seen(event))
                    if profile.shared_stream and events.resource(event) != resource_id:
                        continue  # another resource's event, on the shared stream
                    snap = events.apply(snap, event, tokens, time.time())
                    if snap.status != states[-1]:
                        states.append(snap.status)
    except (aiohttp.ClientError, OSError) as exc:
        report.bad(f"the stream failed: {type(exc).__name__}: {exc}")
        return snap
    known = set(profile.events) | set(profile.keepalive_events)
    if not seen:
        report.bad(
            f"no event arrived in {seconds:g} s (the profile expects a heartbeat every "
            f"{profile.heartbeat_seconds:g} s)"
        )
    else:
        recognised = {k: n for k, n in seen.items() if k in known}
        unknown = {k: n for k, n in seen.items() if k not in known}
        report.ok(f"events arrive: {dict(seen)}")
        if unknown:
            report.note(f"not named in the profile (ignored): {sorted(unknown)}")
        if not recognised:
            report.bad("no event type is one the profile knows: is this the right profile?")
    if malformed:
        report.bad(f"{malformed} event(s) were not JSON objects with a type")
    if len(states) > 1:
        report.note(f"the status as events arrived: {' -> '.join(states)}")
    return snap


async def _enrich(
    http: aiohttp.ClientSession,
    settings: Settings,
    profile: Profile,
    resource_id: str,
    snap: Snapshot,
    report: Report,
) -> None:
    path = profile.enrich.build(resource_id)
    async with http.request(profile.enrich_method, settings.upstream + path) as resp:
        body = await resp.read()  # already decoded by the client
        status, content_type = resp.status, resp.content_type
    if status != 200 or content_type != "application/json":
        report.bad(
            f"{profile.enrich_method} {path} -> {status} {content_type}: nothing to merge into"
        )
        return
    doc = _json_object(body.decode("utf-8", "replace"))
    if doc is None:
        report.bad(f"{profile.enrich_method} {path} answers JSON that is not an object: no merge")
        return
    report.ok(f"{profile.enrich_method} {path} answers JSON ({len(body)} bytes)")
    own = doc.get(profile.key)
    if own is not None:
        report.note(f"the upstream has its own {profile.key!r}: {orjson.dumps(own).decode()}")
    merged = orjson.loads(merge(body, profile.key, snap))[profile.key]
    report.note(f"the sidecar would merge {profile.key!r}: {orjson.dumps(merged).decode()}")


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
