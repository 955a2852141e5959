"""`sidecar check`: plain answers about an upstream, with no side effects."""

from __future__ import annotations

import io

import aiohttp

from sidecar.config import Settings
from sidecar.core.profile import load_profile
from sidecar.demo.fake import FakeGptme
from sidecar.ops.check import run_check

from ..support import run


async def check(upstream: str, **kwargs) -> tuple[int, str]:
    out = io.StringIO()
    settings = Settings(upstream=upstream, **kwargs.pop("settings", {}))
    code = await run_check(settings, load_profile("gptme"), out, seconds=0.5, **kwargs)
    return code, out.getvalue()


async def test_a_working_upstream_is_described(serve) -> None:
    fake = FakeGptme("0.35.1")
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        await http.put(upstream + "/api/v2/conversations/c1", json={"messages": []})
    requests_before = len(fake.requests)
    code, text = await check(upstream)
    assert code == 0, text
    assert "the upstream answers: GET /api/v2 -> 200" in text
    assert "checking 'c1'" in text
    assert "events arrive: {'connected': 1, 'ping': 1}" in text
    assert "the upstream has its own 'session'" in text
    assert "the sidecar would merge 'session'" in text
    assert text.rstrip().endswith("All good.")
    assert not [m for m, _ in fake.requests[requests_before:] if m not in ("GET", "HEAD")]


async def test_missing_credentials_are_named(serve) -> None:
    fake = FakeGptme("0.35.1", token="t")
    upstream = str((await serve(fake.app)).make_url("")).rstrip("/")
    code, text = await check(upstream)
    assert code == 1
    assert "wants credentials" in text
    code, text = await check(upstream, settings={"upstream_authorization": "Bearer t"})
    assert "lists no resource" in text  # authenticated now, and nothing to look at


def test_an_unreachable_upstream_fails_plainly() -> None:
    result = run("check", "--upstream", "http://127.0.0.1:9", "--seconds", "0.2")
    assert result.returncode == 1
    assert "cannot reach the upstream" in result.stdout
