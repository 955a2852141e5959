"""How long gptme 0.31.0 can show "completed" before a tool continues the step.

    make upstreams && python bench/flicker.py [--runs 10]

0.31.0 sends no end-of-step event: between ``generation_complete`` and the
``tool_pending`` that continues the same step, a poller can read
``completed``. This starts the real gptme-server 0.31.0 (installed by
``make upstreams``) with the project's fake model, runs tool steps with and
without auto-confirm, reads its event stream directly and prints the gap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.real import servers


async def gap_ms(http: aiohttp.ClientSession, base: str, n: int, auto: bool) -> float:
    cid = f"flicker-{'auto' if auto else 'asked'}-{n}-{int(time.time() * 1000) % 100000}"
    url = f"{base}/api/v2/conversations/{cid}"
    async with http.put(url, json=servers.gptme_conversation(cid, "tool")) as resp:
        sid = (await resp.json())["session_id"]
    seen: dict[str, float] = {}
    ready = asyncio.Event()

    async def read() -> None:
        async with http.get(url + "/events") as resp:
            async for line in resp.content:
                ready.set()
                if line.startswith(b"data:"):
                    kind = json.loads(line[5:])["type"]
                    seen.setdefault(kind, time.perf_counter())
                    if kind == "tool_pending":
                        return

    reader = asyncio.create_task(read())
    await asyncio.wait_for(ready.wait(), 10)
    async with http.post(url + "/step", json={"session_id": sid, "auto_confirm": auto}):
        pass
    await asyncio.wait_for(reader, 20)
    return (seen["tool_pending"] - seen["generation_complete"]) * 1000


async def main(runs: int) -> None:
    model = servers.start_model()
    gptme = servers.start_gptme("0.31.0", model.url)
    try:
        async with aiohttp.ClientSession() as http:
            for auto in (True, False):
                gaps = [await gap_ms(http, gptme.url, n, auto) for n in range(runs)]
                print(
                    f"tool {'auto-confirmed' if auto else 'left for a human'}: "
                    f"generation_complete -> tool_pending: median {statistics.median(gaps):.2f} ms,"
                    f" max {max(gaps):.2f} ms over {runs} steps"
                )
    finally:
        gptme.stop()
        model.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    asyncio.run(main(parser.parse_args().runs))
