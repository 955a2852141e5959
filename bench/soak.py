"""Soak: 1,000 polling clients and 100 conversations streaming tokens, memory watched.

    python bench/soak.py [--minutes 10] [--clients 1000] [--conversations 100]

Runs the benchmark upstream and a sidecar process. Each conversation streams
a 3 s step of tokens (20 per second), then completes or fails, again and
again; 1,000 clients poll the conversations through the sidecar, one GET per
second each. The sidecar's resident memory is printed at the start, every
minute, and at the end, with the growth from the first minute (which is the
warm-up) to the end: flat means the sidecar keeps nothing it should drop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import Processes, free_port, rss_kib, wait_port  # noqa: E402


async def poller(
    http: aiohttp.ClientSession, url: str, until: float, counts: dict[str, int]
) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            async with http.get(url) as resp:
                body = await resp.json()
                counts[body.get("session", {}).get("status", "none")] = (
                    counts.get(body.get("session", {}).get("status", "none"), 0) + 1
                )
        except (TimeoutError, aiohttp.ClientError):
            counts["error"] = counts.get("error", 0) + 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def soak(args: argparse.Namespace, sidecar: str, upstream: str, pid: int) -> int:
    seconds = args.minutes * 60
    counts: dict[str, int] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for i in range(args.conversations):  # open every subscription first
            async with http.get(f"{sidecar}/api/v2/conversations/soak-{i}") as resp:
                await resp.read()
        await asyncio.sleep(2)
        async with http.post(
            f"{upstream}/control/soak?conversations={args.conversations}&seconds={seconds}"
        ) as resp:
            await resp.read()
        until = time.monotonic() + seconds
        start_rss = rss_kib(pid)
        print(f"{'minute':>6} | {'RSS MiB':>8} | {'polls':>9} | statuses seen", flush=True)
        print(f"{0:>6} | {start_rss / 1024:>8.1f} | {0:>9} |", flush=True)
        pollers = [
            asyncio.create_task(
                poller(
                    http,
                    f"{sidecar}/api/v2/conversations/soak-{i % args.conversations}",
                    until,
                    counts,
                )
            )
            for i in range(args.clients)
        ]
        samples = []
        for minute in range(1, args.minutes + 1):
            await asyncio.sleep(max(0.0, until - seconds + minute * 60 - time.monotonic()))
            rss = rss_kib(pid)
            samples.append(rss)
            polls = sum(counts.values())
            shown = {k: v for k, v in sorted(counts.items())}
            print(f"{minute:>6} | {rss / 1024:>8.1f} | {polls:>9} | {shown}", flush=True)
        await asyncio.gather(*pollers)
    growth = (samples[-1] - samples[0]) / samples[0] * 100 if len(samples) > 1 else 0.0
    print(
        f"\nRSS at start {start_rss / 1024:.1f} MiB, after minute 1 {samples[0] / 1024:.1f} MiB, "
        f"at the end {samples[-1] / 1024:.1f} MiB: {growth:+.1f}% after warm-up"
    )
    print(f"errors: {counts.get('error', 0)} of {sum(counts.values())} polls")
    return 0 if growth < 10 and counts.get("error", 0) == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=100)
    args = parser.parse_args()
    up_port, sc_port = free_port(), free_port()
    procs = Processes()
    try:
        procs.start(sys.executable, str(HERE / "upstream.py"), "--port", str(up_port))
        wait_port(up_port)
        sidecar = procs.start_sidecar(up_port, sc_port)
        wait_port(sc_port)
        return asyncio.run(
            soak(args, f"http://127.0.0.1:{sc_port}", f"http://127.0.0.1:{up_port}", sidecar.pid)
        )
    finally:
        procs.stop()


if __name__ == "__main__":
    sys.exit(main())
