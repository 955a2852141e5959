"""Conformance: odd spellings of a path, sent to the released servers as
raw bytes, against how the sidecar's profile reads them (sidecar.paths).

For every spelling: if the upstream serves the resource (or reaches the
trigger's handler), the sidecar routes the request as that resource's (no
spelling escapes its rules); and where the sidecar routes it as the
resource's, the upstream never answers 2xx with something else. Then the
two attacks of the issue through a sidecar: a conversation deleted through
an encoded path is not served from the cache afterwards, and a step posted
to one is watched as a step.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from sidecar.core.profile import Profile, load_profile

from . import servers
from .test_real_gptme import Gptme

GPTME = load_profile("gptme")
OPENCODE = load_profile("opencode")
_ids = itertools.count(1)


async def raw(
    port: int, method: str, target: bytes, headers: dict[str, str], body: bytes = b""
) -> tuple[int, bytes]:
    """One request of exactly these bytes; its status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n" % (
        method.encode(),
        target,
        port,
    )
    for name, value in headers.items():
        head += f"{name}: {value}\r\n".encode()
    if body or method == "POST":
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    writer.write(head + b"\r\n" + body)
    try:
        async with asyncio.timeout(15):
            answer_head = await reader.readuntil(b"\r\n\r\n")
            fields = answer_head.lower()
            status = int(answer_head.split()[1])
            if b"transfer-encoding: chunked" in fields:
                payload = b""
                while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
                    payload += await reader.readexactly(size)
                    await reader.readline()
            elif b"content-length:" in fields:
                length = int(fields.split(b"content-length:")[1].split(b"\r\n")[0])
                payload = await reader.readexactly(length)
            else:
                payload = await reader.read()
    finally:
        writer.close()
    return status, payload


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def spellings(fixed: str, rid: str, suffix: str = "") -> list[bytes]:
    """Odd spellings of ``fixed/rid/suffix``: escapes, slashes, dots, case,
    ``;``, fragments, backslashes, encoded slashes."""
    r, s, f = rid.encode(), suffix.encode(), fixed.encode()
    first, rest = f.split(b"/")[1], b"/".join(f.split(b"/")[2:])
    lo, up = b"%%%02x" % r[5], b"%%%02X" % r[5]  # the id's sixth character, escaped
    plain = f + b"/" + r + s
    out = [
        plain,
        f[:-1] + b"%%%02x" % f[-1] + b"/" + r + s,  # the fixed part's last letter
        b"/%%%02X" % f[1] + f[2:] + b"/" + r + s,  # its first letter
        f + b"/" + r[:5] + lo + r[6:] + s,
        f + b"/" + r[:5] + up + r[6:] + s,
        f.upper() + b"/" + r + s,
        b"/" + first.capitalize() + (b"/" + rest if rest else b"") + b"/" + r + s,
        b"//" + plain[1:],
        b"///" + plain[1:],
        f + b"//" + r + s,
        plain.replace(b"/", b"//", 2).replace(b"//", b"/", 1),  # "//" after the first segment
        plain + b"/",
        b"/./" + plain[1:],
        b"/x/../" + plain[1:],
        b"/x/%2e%2e/" + plain[1:],
        b"/x/%2E%2E/" + plain[1:],
        plain + b"/.",
        plain + b"/%2e",
        f + b"/./" + r + s,
        f + b";a/" + r + s,
        plain + b";a",
        f + b"%2F" + r + s,
        f.replace(b"/", b"%2F").replace(b"%2F", b"/", 1) + b"%2F" + r + s,
        plain + b"%2F",
        f + b"\\" + r + s,
        f + b"%5C" + r + s,
        plain + b"?",
        plain + b"#frag",
        plain + b"%20",
        plain + b"%00",
    ]
    return list(dict.fromkeys(out))


#: Ids that are not UTF-8 once decoded, and "..": never a resource to the sidecar.
NOT_IDS = [b"%FF", b"%C0%AE", b"%ED%A0%80", b"%2e%2e", b"a%80b"]


def disagreements(
    profile: Profile,
    method: str,
    rid: str,
    results: list[tuple[bytes, int, bool]],
    kind: str,
) -> list[str]:
    """Spellings the upstream served as ``rid`` that the sidecar does not
    route as ``rid``'s ``kind``, and the reverse with a 2xx of something else."""
    bad = []
    for target, status, served in results:
        route = profile.route(method, target.decode("latin-1").partition("?")[0])
        ours = route.kind == kind and route.resource_id == rid
        if served and not ours:
            bad.append(f"{target!r}: the upstream served it ({status}), the sidecar: {route}")
        if ours and not served and 200 <= status < 300:
            bad.append(f"{target!r}: the sidecar routes it as {rid}, the upstream {status}")
    return bad


@pytest.mark.parametrize("version", servers.GPTME_VERSIONS)
async def test_gptme_serves_a_conversation_only_where_the_sidecar_sees_it(
    version: str, request: pytest.FixtureRequest
) -> None:
    upstream = request.getfixturevalue("real_gptme_" + version.replace(".", "_")).running()
    headers = dict(upstream.headers)
    cid = f"paths-{next(_ids)}-{int(time.time() * 1000) % 100000}"
    body = orjson.dumps(servers.gptme_conversation(cid, "ok"))
    status, _ = await raw(
        upstream.port, "PUT", f"/api/v2/conversations/{cid}".encode(), headers, body
    )
    assert status == 200
    results = []
    for target in spellings("/api/v2/conversations", cid):
        status, answer = await raw(upstream.port, "GET", target, headers)
        doc = _json(answer)
        served = status == 200 and isinstance(doc, dict) and "log" in doc
        results.append((target, status, served))
    assert sum(served for *_, served in results) >= 10  # escapes, "%2F", "//", "#", "?"
    assert disagreements(GPTME, "GET", cid, results, "enrich") == []
    # A step's handler is reached (it names the unknown session) exactly
    # where the sidecar routes the request as that conversation's step.
    nosuch = f"nosuch-{next(_ids)}"
    results = []
    for target in spellings("/api/v2/conversations", nosuch, "/step"):
        body = b'{"session_id": "zq9"}'
        status, answer = await raw(upstream.port, "POST", target, headers, body)
        doc = _json(answer)
        error = str(doc.get("error")) if isinstance(doc, dict) else ""
        results.append((target, status, "zq9" in error or nosuch in error))
    assert sum(reached for *_, reached in results) >= 10
    assert disagreements(GPTME, "POST", nosuch, results, "trigger") == []
    # gptme reads "%FF" as U+FFFD and serves (or steps) a conversation of
    # that name; the sidecar passes such a request through as it came.
    for bad in NOT_IDS:
        for method, suffix in (("GET", b""), ("POST", b"/step"), ("DELETE", b"")):
            target = b"/api/v2/conversations/" + bad + suffix
            status, _ = await raw(upstream.port, method, target, headers, b"{}")
            route = GPTME.route(method, target.decode())
            assert route.kind == "pass" and route.resource_id is None, (target, status)


async def test_opencode_serves_a_session_only_where_the_sidecar_sees_it(
    real_opencode: servers.Process,
) -> None:
    upstream = real_opencode.running()
    status, answer = await raw(upstream.port, "POST", b"/session", {}, b"{}")
    assert status == 200
    sid = orjson.loads(answer)["id"]
    results = []
    for target in spellings("/session", sid):
        status, answer = await raw(upstream.port, "GET", target, {})
        doc = _json(answer)
        results.append((target, status, isinstance(doc, dict) and doc.get("id") == sid))
    assert sum(served for *_, served in results) >= 10  # escapes, case, "//", "/", ";", "#"
    assert disagreements(OPENCODE, "GET", sid, results, "enrich") == []
    # An abort of an idle session answers `true` where its handler runs.
    results = []
    for target in spellings("/session", sid, "/abort"):
        status, answer = await raw(upstream.port, "POST", target, {}, b"{}")
        results.append((target, status, status == 200 and answer.strip() == b"true"))
    assert sum(reached for *_, reached in results) >= 10
    assert disagreements(OPENCODE, "POST", sid, results, "trigger") == []
    for bad in NOT_IDS:
        status, _ = await raw(upstream.port, "GET", b"/session/" + bad, {})
        assert status >= 400 and OPENCODE.route("GET", "/session/" + bad.decode()).kind == "pass"


# ------------------------------------------------- through the sidecar


@pytest.mark.parametrize("version", servers.GPTME_VERSIONS)
@pytest.mark.parametrize("spelling", ["/api/v2/conversation%73/{}", "/api/v2/%63onversations/{}"])
async def test_a_conversation_deleted_through_an_encoded_path_is_not_served_from_the_cache(
    version: str,
    spelling: str,
    request: pytest.FixtureRequest,
    start_sidecar: Any,
    http: aiohttp.ClientSession,
) -> None:
    upstream = request.getfixturevalue("real_gptme_" + version.replace(".", "_")).running()
    sidecar = await start_sidecar(upstream.url, cache="events")
    gptme = Gptme(upstream, sidecar, http)
    cid, _ = await gptme.create("ok")
    await gptme.live(cid)
    url = gptme.conversation_url(cid)
    for _ in range(20):
        async with http.get(url, headers=gptme.headers) as resp:
            if resp.headers.get("Cache-Status", "").startswith("sidecar; hit"):
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("never a hit")
    target = sidecar.url + spelling.format(cid)
    async with http.delete(URL(target, encoded=True), headers=gptme.headers) as resp:
        assert resp.status == 200, await resp.text()
    # Gone upstream (0.35.1 answers 404, 0.31.0 an HTML 500), and so
    # through the sidecar: the write made the cached body stale.
    direct = gptme.conversation_url(cid, direct=True)
    async with http.get(direct, headers=gptme.headers) as resp:
        assert resp.status >= 400
    async with http.get(url, headers=gptme.headers) as resp:
        assert resp.status >= 400, (resp.status, resp.headers.get("Cache-Status"))
        assert "hit" not in resp.headers.get("Cache-Status", "")


@pytest.mark.parametrize("version", servers.GPTME_VERSIONS)
async def test_a_step_posted_to_an_encoded_path_is_watched_as_a_step(
    version: str, request: pytest.FixtureRequest, start_sidecar: Any, http: aiohttp.ClientSession
) -> None:
    upstream = request.getfixturevalue("real_gptme_" + version.replace(".", "_")).running()
    sidecar = await start_sidecar(upstream.url)
    gptme = Gptme(upstream, sidecar, http)
    cid, sid = await gptme.create("slow")
    await gptme.live(cid)
    target = URL(f"{sidecar.url}/api/v2/conversations/{cid}/%73tep", encoded=True)
    async with gptme.witness(cid) as witness:
        async with http.post(target, json={"session_id": sid}, headers=gptme.headers) as resp:
            assert resp.status == 200, await resp.text()
        # Answered after the trigger's own handling: the next read is working.
        state = await gptme.poller.state(cid)
        assert state["generating"] is True and state["status"] != "unknown", state
        # An interrupt gptme receives before its step thread has begun is
        # lost (the step then runs to its end): interrupt once it streams.
        await witness.wait_for("generation_progress")
        interrupt = f"{gptme.conversation_url(cid)}/interrupt"
        async with http.post(interrupt, json={"session_id": sid}, headers=gptme.headers) as resp:
            assert resp.status == 200
        await gptme.poller.wait(cid, "interrupted", witness)
