"""Conformance: ``sidecar check`` reads a released gptme's events as the registry does.

Both use one reading of events (``sidecar.core.events``): a step with an
auto-confirmed tool, watched at once by ``sidecar check`` and by a sidecar in
front of the same server, goes through the same statuses in both. On 0.35.1
this needs the ``if_seen = ["connected:generating"]`` condition to hold under
``check`` too: without it, ``check`` showed ``completed`` between the answer
and the tool.
"""

from __future__ import annotations

import asyncio
import io
import re
from typing import Any

import aiohttp
import pytest

from sidecar.config import Settings
from sidecar.core.profile import load_profile
from sidecar.ops.check import run_check

from . import servers
from .test_real_gptme import Gptme

pytestmark = [
    pytest.mark.parametrize("version", servers.GPTME_VERSIONS),
    pytest.mark.flaky(reruns=2, only_rerun=servers.UPSTREAM_FAULTS),
]


@pytest.fixture
async def gptme(
    version: str, request: pytest.FixtureRequest, start_sidecar: Any, http: aiohttp.ClientSession
) -> Gptme:
    upstream = request.getfixturevalue("real_gptme_" + version.replace(".", "_")).running()
    sidecar = await start_sidecar(upstream.url)
    return Gptme(upstream, sidecar, http)


async def test_check_reports_the_statuses_the_registry_goes_through(gptme: Gptme) -> None:
    cid, sid = await gptme.create("tool")
    await gptme.live(cid)
    token = gptme.headers.get("Authorization")
    settings = Settings(upstream=gptme.upstream.url, upstream_authorization=token)
    out = io.StringIO()
    checking = asyncio.create_task(
        run_check(settings, load_profile("gptme"), out, resource_id=cid, seconds=8.0)
    )
    await asyncio.sleep(1.0)  # check's stream is open and live
    async with gptme.witness(cid) as witness:
        assert await gptme.step(cid, sid, direct=True, auto_confirm=True) == 200
        await gptme.poller.wait(
            cid,
            lambda s: (
                s["status"] == "completed" and witness.types().count("generation_complete") >= 2
            ),
            witness,
            timeout=20,
        )
    await asyncio.wait_for(checking, 20)
    report = out.getvalue()
    found = re.search(r"the status as events arrived: (.*)", report)
    assert found is not None, report
    by_check = found.group(1).split(" -> ")
    by_registry: list[str] = []
    for transition in gptme.sidecar.registry.get(cid).transitions:
        if not by_registry or by_registry[-1] != transition["status"]:
            by_registry.append(transition["status"])
    assert by_check == by_registry, report
    assert "running_tool" in by_check and by_check[-1] == "completed", report
