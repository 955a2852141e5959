"""Pollers against the real gptme-server 0.31.0: direct, and through the sidecar
with its response cache off and on.

    make bench            # or: python bench/gptme.py [--duration 20] [--pollers 200]

gptme-server 0.31.0 is the release the conformance suite installs (``python
-m tests.real.servers install``, run by ``make test``), started the same way.
It holds 20 conversations of 40 messages (about 64 KiB each), written to disk
as an earlier server process would have left them. 200 pollers each send one
``GET /api/v2/conversations/{id}`` a second (a random phase each, spread
over the 20 conversations, one connection each); a poller whose answer is
late sends the next at once, so an overloaded server shows as fewer polls
per second. Printed per path: polls answered per second, p50 and p99
latency, non-200 answers, and the upstream GETs per second (the sidecar's
metric of enrich requests sent upstream).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import ADMIN_TOKEN, Figures, Processes, free_port, wait_port  # noqa: E402

from tests.real import servers  # noqa: E402

#: 40 messages: about 64 KiB as gptme serves them (it sends the log twice,
#: as ``log`` and in ``branches``).
MESSAGES = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "x" * 700}
    for i in range(40)
]


async def pollers(
    base: str, conversations: list[str], count: int, duration: float, warmup: float
) -> tuple[int, list[float], int]:
    """Answers in the measured window, their latencies (s), and non-200 answers."""
    latencies: list[float] = []
    errors = 0
    start = time.monotonic() + warmup
    end = start + duration

    async def poller(i: int, http: aiohttp.ClientSession) -> None:
        nonlocal errors
        url = f"{base}/api/v2/conversations/{conversations[i % len(conversations)]}"
        due = time.monotonic() + random.random()
        while True:
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            sent = time.monotonic()
            if sent >= end:
                return
            async with http.get(url) as resp:
                await resp.read()
                status = resp.status
            took = time.monotonic() - sent
            if sent >= start:
                latencies.append(took)
                if status != 200:
                    errors += 1
            due += 1.0

    async def one(i: int) -> None:
        # One connection per poller, as separate clients have.
        connector = aiohttp.TCPConnector(limit=1, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as http:
            await poller(i, http)

    await asyncio.gather(*(one(i) for i in range(count)))
    return len(latencies), latencies, errors


async def upstream_gets(http: aiohttp.ClientSession, sidecar: str) -> float:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(sidecar + "/_sidecar/metrics", headers=auth) as resp:
        text = await resp.text()
    m = re.search(
        r'^sidecar_upstream_latency_seconds_count\{kind="enrich"\} ([\d.e+]+)$', text, re.M
    )
    return float(m.group(1)) if m else 0.0


async def warm(base: str, conversations: list[str]) -> None:
    """One read of each conversation, so the sidecar's streams are live."""
    async with aiohttp.ClientSession() as http:
        for cid in conversations:
            for _ in range(3):
                async with http.get(f"{base}/api/v2/conversations/{cid}") as resp:
                    await resp.read()
                    if resp.status == 200:
                        break
    await asyncio.sleep(1.5)


async def measure(
    name: str, base: str, sidecar: bool, conversations: list[str], args: argparse.Namespace
) -> dict[str, float]:
    await warm(base, conversations)
    async with aiohttp.ClientSession() as http:
        before = await upstream_gets(http, base) if sidecar else 0.0
        answered, latencies, errors = await pollers(
            base, conversations, args.pollers, args.duration, warmup=1.0
        )
        after = await upstream_gets(http, base) if sidecar else 0.0
    latencies.sort()
    rate = answered / args.duration
    # The upstream GETs of the whole run (warm-up included) over its length.
    upstream = (after - before) / (args.duration + 2.0) if sidecar else rate
    return {
        "polls/s": rate,
        "p50 ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99 ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000 if latencies else 0,
        "errors": errors,
        "upstream GETs/s": upstream,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per path")
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/ab.py)")
    args = parser.parse_args()
    try:
        servers.require(servers.gptme_dir("0.31.0"), "gptme-server 0.31.0")
    except servers.NotInstalled as exc:
        print(f"bench/gptme.py: {exc} (python -m tests.real.servers install)")
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    procs = Processes()
    model = servers.start_model()
    gptme = servers.start_gptme("0.31.0", model.url)
    try:
        conversations = [f"bench-{i}" for i in range(args.conversations)]
        for cid in conversations:
            gptme.seed_gptme_conversation(cid, MESSAGES)
        off, on = free_port(), free_port()
        procs.start_sidecar(gptme.port, off, "--store", "memory")
        procs.start_sidecar(gptme.port, on, "--store", "memory", "--cache", "events")
        wait_port(off)
        wait_port(on)
        path = f"/api/v2/conversations/{conversations[0]}"
        with urllib.request.urlopen(gptme.url + path) as resp:
            size = len(resp.read())
        print(
            f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}"
        )
        print(
            f"gptme-server 0.31.0, {args.conversations} conversations of {len(MESSAGES)} messages"
            f" ({size / 1024:.0f} KiB as served), {args.pollers} pollers at 1 GET/s each,"
            f" {args.duration:g} s measured per path\n"
        )
        results = {
            "direct": asyncio.run(measure("direct", gptme.url, False, conversations, args)),
            "sidecar, cache off": asyncio.run(
                measure("off", f"http://127.0.0.1:{off}", True, conversations, args)
            ),
            "sidecar, cache on": asyncio.run(
                measure("on", f"http://127.0.0.1:{on}", True, conversations, args)
            ),
        }
    finally:
        procs.stop()
        gptme.stop()
        model.stop()
    head = (
        f"{'path':<19} | {'polls/s':>7} | {'p50 ms':>8} | {'p99 ms':>8} | {'non-200':>7} "
        f"| {'upstream GETs/s':>15} | {'upstream share':>14}"
    )
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        share = r["upstream GETs/s"] / r["polls/s"] if r["polls/s"] else float("nan")
        print(
            f"{name:<19} | {r['polls/s']:>7.1f} | {r['p50 ms']:>8.1f} | {r['p99 ms']:>8.1f} "
            f"| {int(r['errors']):>7} | {r['upstream GETs/s']:>15.1f} | {share:>13.1%}"
        )
    on_r = results["sidecar, cache on"]
    share = on_r["upstream GETs/s"] / on_r["polls/s"] if on_r["polls/s"] else 1.0
    print("\nfigure (cache on, in front of gptme 0.31.0)   | measured      | target")
    print("-" * 78)
    checks = [
        ("polls answered per second", f"{on_r['polls/s']:.1f}", ">= 150", on_r["polls/s"] >= 150),
        ("p99 latency", f"{on_r['p99 ms']:.1f} ms", "< 20 ms", on_r["p99 ms"] < 20),
        ("upstream GETs / polls", f"{share:.1%}", "<= 10%", share <= 0.10),
    ]
    for name, value, target, ok in checks:
        print(f"{name:<46} | {value:>13} | {target}  {'ok' if ok else 'MISSED'}")
    if args.json is not None:
        figures = Figures()
        for name in ("sidecar, cache off", "sidecar, cache on"):
            figures.lower(f"gptme 0.31.0, {name}, p50 ms", results[name]["p50 ms"])
            figures.lower(f"gptme 0.31.0, {name}, p99 ms", results[name]["p99 ms"])
        figures.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
