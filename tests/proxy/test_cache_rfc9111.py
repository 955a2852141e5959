"""The response cache is a shared cache as RFC 9111 defines one
(sidecar.cache_policy), with the two exceptions the README argues: what
another client must never get, what the upstream says of freshness, what
the key holds, and what the cache's memory bound counts."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import tracemalloc
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.demo.fake import FakeGptme
from sidecar.proxy.cache import Baseline, Entry, ResponseCache
from sidecar.proxy.cache_policy import asked, directives, storable

from ..conftest import eventually
from . import test_targets as targets

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GPTME_PROFILE = (Path(__file__).resolve().parents[2] / "config/gptme.toml").read_text()
CID = "c1"
PATH = f"/api/v2/conversations/{CID}"


class Upstream:
    """A fake gptme whose enrich GET a test reshapes, and the sidecar in front."""

    def __init__(self, fake: FakeGptme, sidecar: Any, http: aiohttp.ClientSession) -> None:
        self.fake = fake
        self.sidecar = sidecar
        self.http = http

    def gets(self) -> int:
        return self.fake.requests.count(("GET", PATH))

    async def get(self, path: str = PATH, **headers: str) -> tuple[aiohttp.ClientResponse, Any]:
        async with self.http.get(
            URL(self.sidecar.url + path, encoded=True), headers=headers
        ) as resp:
            body = await resp.read()
            return resp, orjson.loads(body) if body and resp.status == 200 else None

    async def live(self, **headers: str) -> None:
        resp, _ = await self.get(**headers)
        assert resp.status == 200
        await eventually(lambda: self.sidecar.snapshot(CID).stream == "live")


@pytest.fixture
def upstream(serve, start_sidecar, http):
    async def start(
        shape: Callable[[web.Request, web.Response], None] | None = None,
        profile: str = "gptme",
        **fake_options: Any,
    ) -> Upstream:
        fake = FakeGptme("0.31.0", **fake_options)

        @web.middleware
        async def reshape(request: web.Request, handler: Handler) -> web.StreamResponse:
            resp = await handler(request)
            if (
                shape is not None
                and request.method == "GET"
                and request.path == PATH
                and isinstance(resp, web.Response)
            ):
                shape(request, resp)
            return resp

        fake.app.middlewares.append(reshape)
        server = await serve(fake.app)
        base = str(server.make_url("")).rstrip("/")
        async with http.put(
            base + PATH, json={"messages": [{"role": "user", "content": "hi"}]}
        ) as resp:
            assert resp.status == 200
        sidecar = await start_sidecar(base, cache="events", profile=profile)
        return Upstream(fake, sidecar, http)

    return start


def _rewrite(resp: web.Response, **fields: Any) -> None:
    assert resp.body is not None
    doc = orjson.loads(bytes(resp.body))  # type: ignore[arg-type]
    doc.update(fields)
    resp.body = orjson.dumps(doc)


# ------------------------------------------------ never another's answer


def _per_api_key(private: bool) -> Callable[[web.Request, web.Response], None]:
    """An upstream that authenticates by X-Api-Key, answering with the user's data."""

    def shape(request: web.Request, resp: web.Response) -> None:
        user = request.headers.get("X-Api-Key")
        if user is None:
            resp.set_status(401)
            resp.body = b'{"error": "X-Api-Key required"}'
            return
        _rewrite(resp, user=user)
        if private:
            resp.headers["Cache-Control"] = "private"

    return shape


async def test_a_private_answer_is_never_stored_so_never_served_to_another(upstream) -> None:
    # The built-in profile does not name X-Api-Key: only `private` says the
    # answer is Alice's, and a shared cache must not store it.
    u = await upstream(_per_api_key(private=True))
    await u.live(**{"X-Api-Key": "alice"})
    for _ in range(3):
        resp, body = await u.get(**{"X-Api-Key": "alice"})
        assert body["user"] == "alice"
        assert "stored" not in resp.headers["Cache-Status"]
        assert "hit" not in resp.headers["Cache-Status"]
    resp, body = await u.get(**{"X-Api-Key": "bob"})
    assert body["user"] == "bob"
    resp, _ = await u.get()
    assert resp.status == 401


async def test_a_credential_header_the_profile_names_keeps_clients_apart(
    upstream, tmp_path: Path
) -> None:
    text = GPTME_PROFILE.replace('headers = ["Authorization", "Cookie"]', 'headers = ["X-Api-Key"]')
    profile = tmp_path / "api-key.toml"
    profile.write_text(text)
    u = await upstream(_per_api_key(private=False), profile=str(profile))
    await u.live(**{"X-Api-Key": "alice"})
    resp, body = await u.get(**{"X-Api-Key": "alice"})
    assert "stored" in resp.headers["Cache-Status"]
    resp, body = await u.get(**{"X-Api-Key": "alice"})
    assert body["user"] == "alice" and resp.headers["Cache-Status"].startswith("sidecar; hit")
    resp, body = await u.get(**{"X-Api-Key": "bob"})
    assert body["user"] == "bob" and "hit" not in resp.headers["Cache-Status"]
    resp, _ = await u.get()
    assert resp.status == 401


# ----------------------------------------------------- freshness


def _cache_control(value: str) -> Callable[[web.Request, web.Response], None]:
    def shape(request: web.Request, resp: web.Response) -> None:
        resp.headers["Cache-Control"] = value

    return shape


@pytest.mark.parametrize(
    "value",
    [
        "s-maxage=0, must-revalidate",
        "max-age=0, proxy-revalidate",
        "max-age=60, s-maxage=0, must-revalidate",  # s-maxage is a shared cache's
        "must-revalidate",  # no lifetime given: stale at once
    ],
)
async def test_must_revalidate_once_stale_is_asked_of_the_upstream_every_time(
    upstream, value: str
) -> None:
    u = await upstream(_cache_control(value), etag=True)
    await u.live()
    before = u.gets()
    for _ in range(4):
        resp, body = await u.get()
        assert resp.status == 200 and body["id"] == CID
        assert not resp.headers["Cache-Status"].startswith("sidecar; hit"), value
    assert u.gets() == before + 4
    # With a validator, the upstream's 304 keeps the body: it is not sent again.
    assert "detail=must_revalidate" in resp.headers["Cache-Status"]


async def test_must_revalidate_while_fresh_is_a_hit_then_revalidated(upstream) -> None:
    u = await upstream(_cache_control("s-maxage=1, must-revalidate"), etag=True)
    await u.live()
    await u.get()
    resp, _ = await u.get()
    assert resp.headers["Cache-Status"].startswith("sidecar; hit")
    await asyncio.sleep(1.1)
    before = u.gets()
    resp, _ = await u.get()
    assert "detail=must_revalidate" in resp.headers["Cache-Status"]
    assert u.gets() == before + 1


async def test_no_cache_and_a_stale_answer_are_validated_by_the_events(upstream) -> None:
    # The argued exception: the upstream's no-cache (gptme 0.35.1 sends it)
    # and a lifetime of 0 without must-revalidate: the events validate.
    u = await upstream(_cache_control("no-cache, max-age=0"))
    await u.live()
    await u.get()
    resp, _ = await u.get()
    assert resp.headers["Cache-Status"].startswith("sidecar; hit")


async def test_the_clients_own_max_age_and_only_if_cached(upstream) -> None:
    u = await upstream()
    await u.live()
    resp, _ = await u.get(**{"Cache-Control": "only-if-cached"})
    assert resp.status == 504  # nothing stored yet (RFC 9111 5.2.1.7)
    resp, _ = await u.get()
    assert "stored" in resp.headers["Cache-Status"]
    resp, _ = await u.get(**{"Cache-Control": "only-if-cached"})
    assert resp.headers["Cache-Status"].startswith("sidecar; hit")
    await asyncio.sleep(1.1)
    resp, _ = await u.get(**{"Cache-Control": "max-age=1"})
    assert "detail=max_age" in resp.headers["Cache-Status"]
    resp, _ = await u.get(**{"Cache-Control": "max-age=30"})
    assert resp.headers["Cache-Status"].startswith("sidecar; hit")
    resp, _ = await u.get(PATH + "?other=1", **{"Cache-Control": "only-if-cached"})
    assert resp.status == 504


# ---------------------------------------------------------- the key


def _self_url(request: web.Request, resp: web.Response) -> None:
    """An upstream that builds absolute URLs from what a proxy forwards."""
    host = request.headers.get("X-Forwarded-Host", request.host)
    forwarded = request.headers.get("Forwarded", "")
    if "host=" in forwarded:
        host = forwarded.split("host=")[1].split(";")[0].split(",")[0]
    prefix = request.headers.get("X-Forwarded-Prefix", "")
    _rewrite(resp, self=f"http://{host}{prefix}{PATH}")


@pytest.mark.parametrize(
    "poison",
    [
        {"Host": "evil.example"},
        {"Forwarded": "host=evil.example"},
        {"X-Forwarded-Prefix": "/evil"},
    ],
)
async def test_what_the_upstream_builds_urls_from_is_in_the_key(upstream, poison) -> None:
    u = await upstream(_self_url)
    await u.live()
    for _ in range(2):
        resp, body = await u.get(**poison)
        assert "evil" in body["self"]
    # Another client, the same target and credentials: never the poisoned answer.
    for _ in range(3):
        resp, body = await u.get()
        assert "evil" not in body["self"], (resp.headers["Cache-Status"], body["self"])
    assert resp.headers["Cache-Status"].startswith("sidecar; hit")


async def test_a_vary_on_a_header_the_sidecar_sets_per_connection_is_not_stored(
    upstream,
) -> None:
    u = await upstream(lambda request, resp: resp.headers.__setitem__("Vary", "X-Forwarded-For"))
    await u.live()
    for _ in range(3):
        resp, _ = await u.get()
        assert "stored" not in resp.headers["Cache-Status"]


async def test_a_vary_compares_every_field_line(upstream) -> None:
    u = await upstream(lambda request, resp: resp.headers.__setitem__("Vary", "Accept-Language"))
    await u.live()
    async with u.http.get(
        u.sidecar.url + PATH, headers=[("Accept-Language", "en"), ("Accept-Language", "fr")]
    ) as resp:
        assert "stored" in resp.headers["Cache-Status"]
    resp, _ = await u.get(**{"Accept-Language": "en"})
    assert "detail=vary" in resp.headers["Cache-Status"]


async def test_a_key_too_long_is_asked_upstream_not_kept(upstream) -> None:
    u = await upstream()
    await u.live()
    long = PATH + "?q=" + "x" * 5000
    for _ in range(2):
        resp, body = await u.get(long)
        assert resp.status == 200 and body["id"] == CID
        assert "detail=key_too_long" in resp.headers["Cache-Status"]


# --------------------------------------------------------- the rules


def test_directives_are_parsed_as_rfc_9110_lists() -> None:
    found = directives(['private="Set-Cookie, X-Token", max-age=5', "No-Store , s-maxage = 3"])
    assert found == {
        "private": "Set-Cookie, X-Token",
        "max-age": "5",
        "no-store": None,
        "s-maxage": "3",
    }
    assert asked(CIMultiDict({"Pragma": "no-cache"})).no_cache
    assert not asked(CIMultiDict({"Pragma": "no-cache", "Cache-Control": "max-age=9"})).no_cache
    assert asked(CIMultiDict({"Cache-Control": "max-age=0"})).no_cache


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Cache-Control": "private"}, "private"),
        ({"Cache-Control": 'private="Authorization"'}, "private"),
        ({"Cache-Control": "no-store"}, "no_store"),
        ({"Set-Cookie": "a=b"}, "set_cookie"),
        ({"Vary": "*"}, "vary"),
        ({"Vary": "Accept, X-Forwarded-For"}, "vary"),
    ],
)
def test_what_a_shared_cache_must_not_store(headers, expected) -> None:
    assert storable(200, CIMultiDict(headers), frozenset()) == expected


def test_freshness_as_a_shared_cache_reads_it() -> None:
    def lifetime(**headers: str) -> float | None:
        policy = storable(200, CIMultiDict(headers), frozenset(), now=1000.0)
        assert not isinstance(policy, str)
        return policy.lifetime

    assert lifetime() is None
    assert lifetime(**{"Cache-Control": "max-age=7"}) == 7
    assert lifetime(**{"Cache-Control": "max-age=7, s-maxage=2"}) == 2
    assert lifetime(**{"Cache-Control": "s-maxage=x"}) == 0
    assert lifetime(Expires="0") == 0
    assert (
        lifetime(Expires="Thu, 01 Jan 1970 00:20:00 GMT", Date="Thu, 01 Jan 1970 00:10:00 GMT")
        == 600
    )
    policy = storable(200, CIMultiDict({"Vary": "Host, Accept"}), frozenset({"host"}))
    assert not isinstance(policy, str) and policy.vary == ("accept",)


# ----------------------------------------------------------- memory


def test_the_bytes_counted_cover_what_an_entry_takes() -> None:
    """tracemalloc's count of an entry (key, headers, bodies, the objects
    around them, its place in the LRU map) never exceeds the bytes counted."""

    class Sub:
        pass

    baseline = Baseline(1, Sub(), 1)  # type: ignore[arg-type]

    def entry(i: int, headers: int, key: int, body: int) -> Entry:
        return Entry(
            key=(f"/c{i}?" + "q" * key, os.urandom(32).hex(), "gzip", "h:1", "", "", "", ""),
            baseline=baseline,
            stored_at=time.monotonic(),
            status=200,
            reason=None,
            headers=CIMultiDict([(f"X-H{j}", "v" * 20) for j in range(headers)]),
            prior_via=(),
            body=os.urandom(body),
            encoding="",
            upstream_tag='W/"0123456789abcdef"',
            upstream_length=body,
            vary=(),
            merged=os.urandom(body + 100),
        )

    tracemalloc.start()
    try:
        for headers, key, body in [(0, 10, 10), (7, 50, 300), (40, 10, 10), (3, 4000, 10)]:
            cache = ResponseCache(5, 10**12)
            before = tracemalloc.get_traced_memory()[0]
            for i in range(2000):
                cache.put(entry(i, headers, key, body))
            taken = tracemalloc.get_traced_memory()[0] - before
            assert taken <= cache.bytes, (headers, key, body, taken / 2000, cache.bytes / 2000)
            del cache
    finally:
        tracemalloc.stop()


def test_a_real_process_holds_its_cache_within_the_bound() -> None:
    """12,000 GETs with distinct 3 KB query strings (small entries, large
    keys) through a sidecar process: its resident memory grows by at most
    1.5 x cache_max_bytes, and the cache's own count stays within it."""
    limit = 8 * 1024 * 1024
    fake = FakeGptme("0.31.0")
    with targets.Upstream(fake.app) as up:
        put = urllib.request.Request(
            f"http://127.0.0.1:{up.port}{PATH}",
            data=b'{"messages": [{"role": "user", "content": "hi"}]}',
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(put, timeout=10).close()
        process = targets.Process(
            up.port,
            "gptme",
            True,
            ("--cache-max-bytes", str(limit), "--admin-token", "adm"),
        )
        try:
            with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
                deadline = time.monotonic() + 10
                while b"stored" not in _pipelined(sock, [PATH])[0]:
                    assert time.monotonic() < deadline, "the stream never went live"
                    time.sleep(0.05)
                counter = itertools.count()

                def batch(n: int) -> None:
                    paths = [f"{PATH}?n={next(counter)}&q={'x' * 3000}" for _ in range(n)]
                    heads = _pipelined(sock, paths)
                    assert all(h.startswith(b"HTTP/1.1 200 ") for h in heads)

                batch(20)  # warm: every path of the code has run
                before = process.rss()
                for _ in range(120):
                    batch(100)
                grown = process.rss() - before
                metrics = _pipelined(
                    sock, ["/_sidecar/metrics"], {"Authorization": "Bearer adm"}, body=True
                )[0]
        finally:
            process.stop()
    held = float(metrics.split(b"\nsidecar_cache_bytes ")[1].split()[0])
    entries = float(metrics.split(b"\nsidecar_cache_entries ")[1].split()[0])
    assert held <= limit and entries * 3000 <= limit
    assert grown <= 1.5 * limit, f"RSS grew by {grown / 2**20:.1f} MiB, bound {limit / 2**20:.0f}"


def _pipelined(
    sock: socket.socket, paths: list[str], headers: dict[str, str] | None = None, body=False
) -> list[bytes]:
    """Send these GETs at once; each answer's head (and body, if asked)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(
        "".join(f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n" for p in paths).encode()
    )
    out = []
    data = b""
    deadline = time.monotonic() + 30
    for _ in paths:
        while b"\r\n\r\n" not in data:
            data += targets._recv(sock, deadline)
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(data) < length:
            data += targets._recv(sock, deadline)
        out.append(head + (b"\r\n\r\n" + data[:length] if body else b""))
        data = data[length:]
    return out
