"""Webhook deliveries per second to a local receiver, and transition -> delivery latency.

    make bench            # or: python bench/webhooks.py [--transitions 2000] [--samples 200]

The bench upstream (``bench/upstream.py``) is both the event source and the
receiver: ``POST /control/flips`` writes state-changing events
(``generation_started`` and ``error`` in turn, each one a transition) to a
conversation's stream as fast as it can, and ``POST /hooks`` answers 204 and
notes when each webhook arrived. One sidecar process per outbox (``memory``,
the default ``sqlite`` file, ``redis://`` with a real redis-server when it
is installed), each with one receiver for ``generating`` and ``failed``.

* **Deliveries per second**: ``--transitions`` transitions at once; the
  time from the first event written to the last webhook received. The
  baseline, in the same run and alternating with it (``--rounds``, medians):
  the same number of POSTs of a webhook's body to the same receiver from a
  plain aiohttp client (one connection, one at a time, as a courier sends),
  unsigned, with nothing stored.
* **Transition -> delivery**: ``--samples`` events one at a time; from the
  event written upstream to its webhook received (the receiver's own clock,
  the same process). The baseline, in the same run and sidecar: from an
  event written to a held ``Prefer: wait`` GET answered (``bench/run.py``'s
  long-poll latency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import Figures, Processes, free_port, latency, wait_port  # noqa: E402

CONVERSATION = "latency"


async def arrivals(http: aiohttp.ClientSession, upstream: str) -> list[float]:
    async with http.get(upstream + "/control/hooks") as resp:
        return list((await resp.json())["arrivals"])


async def prepare(http: aiohttp.ClientSession, sidecar: str, upstream: str) -> None:
    """The conversation observed, its stream live, and its status failed
    (so the next generation_started is a transition); the receiver emptied."""
    url = f"{sidecar}/api/v2/conversations/{CONVERSATION}"
    for _ in range(200):
        async with http.get(url) as resp:
            state = (await resp.json())["session"]
        if state["stream"] == "live":
            break
        await asyncio.sleep(0.05)
    if state["status"] != "failed":
        async with http.post(upstream + "/control/flips?n=2"):
            pass
    await asyncio.sleep(1.0)
    async with http.post(upstream + "/control/hooks/reset"):
        pass


async def throughput(sidecar: str, upstream: str, n: int) -> float:
    """Webhooks delivered per second, for n transitions at once."""
    async with aiohttp.ClientSession() as http:
        await prepare(http, sidecar, upstream)
        async with http.post(upstream + f"/control/flips?n={n}") as resp:
            started = (await resp.json())["t"]
        deadline = time.monotonic() + 120
        got: list[float] = []
        while time.monotonic() < deadline:
            got = await arrivals(http, upstream)
            if len(got) >= n:
                break
            await asyncio.sleep(0.1)
        if len(got) < n:
            raise SystemExit(f"{sidecar}: {len(got)} of {n} webhooks delivered in 120 s")
    return n / (max(got) - started)


async def baseline_posts(upstream: str, n: int) -> float:
    """Plain POSTs of a webhook-sized body per second, one connection, one at a time."""
    body = b'{"type":"conversation.failed","data":{"snapshot":{}}}' + b" " * 480
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        started = time.perf_counter()
        for _ in range(n):
            async with http.post(upstream + "/hooks", data=body) as resp:
                await resp.read()
        seconds = time.perf_counter() - started
        async with http.post(upstream + "/control/hooks/reset"):
            pass
    return n / seconds


async def delivery_latency(sidecar: str, upstream: str, samples: int) -> tuple[float, float]:
    """From an event written upstream to its webhook received: p50 and p99 (ms)."""
    out = []
    async with aiohttp.ClientSession() as http:
        await prepare(http, sidecar, upstream)
        for i in range(samples):
            async with http.post(upstream + "/control/emit") as resp:
                written = (await resp.json())["t"]
            for _ in range(2000):
                got = await arrivals(http, upstream)
                if len(got) > i:
                    break
                await asyncio.sleep(0.002)
            else:
                raise SystemExit("a webhook did not arrive within 4 s")
            out.append((got[i] - written) * 1000)
    out.sort()
    return statistics.median(out), out[max(0, int(len(out) * 0.99) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transitions", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (medians)")
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/ab.py)")
    args = parser.parse_args()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        secret = tmp / "secret"
        secret.write_text("whsec_" + base64.b64encode(os.urandom(32)).decode())
        procs = Processes()
        up = free_port()
        stores = {"memory": "memory", "sqlite": f"sqlite:{tmp / 'state.db'}"}
        try:
            procs.start(sys.executable, str(HERE / "upstream.py"), "--port", str(up))
            wait_port(up)
            if Path(redis).exists():
                redis_port = free_port()
                procs.start(
                    redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp),
                    "--save", "", "--appendonly", "no",
                )  # fmt: skip
                wait_port(redis_port)
                stores["redis"] = f"redis://127.0.0.1:{redis_port}/0"
            upstream = f"http://127.0.0.1:{up}"
            results = {}
            for name, store in stores.items():
                port = free_port()
                sidecar = procs.start_sidecar(
                    up, port, "--store", store, "--webhook-url", f"{upstream}/hooks",
                    "--webhook-secret-file", str(secret), "--webhook-statuses",
                    "generating,failed",
                )  # fmt: skip
                wait_port(port)
                base = f"http://127.0.0.1:{port}"
                raws, rates = [], []
                for _ in range(args.rounds):  # alternately: the machine's noise hits both
                    raws.append(asyncio.run(baseline_posts(upstream, args.transitions)))
                    rates.append(asyncio.run(throughput(base, upstream, args.transitions)))
                raw, rate = statistics.median(raws), statistics.median(rates)
                hook50, hook99 = asyncio.run(delivery_latency(base, upstream, args.samples))
                poll50, poll99 = asyncio.run(latency(base, upstream, args.samples))
                results[name] = (raw, rate, hook50, hook99, poll50, poll99)
                sidecar.terminate()
                sidecar.wait(10)
        finally:
            procs.stop()
    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; {args.transitions} transitions at once "
        f"({args.rounds} rounds alternating with the plain POSTs, medians), "
        f"{args.samples} one at a time\n"
    )
    head = (
        f"{'outbox':<8} | {'plain POSTs/s':>13} | {'webhooks/s':>10} | {'x plain':>7} "
        f"| {'event->webhook p50/p99 ms':>25} | {'event->long-poll p50/p99 ms':>27}"
    )
    print(head)
    print("-" * len(head))
    figures = Figures()
    for name, (raw, rate, h50, h99, p50, p99) in results.items():
        print(
            f"{name:<8} | {raw:>13.0f} | {rate:>10.0f} | {rate / raw:>7.2f} "
            f"| {f'{h50:.2f} / {h99:.2f}':>25} | {f'{p50:.2f} / {p99:.2f}':>27}"
        )
        figures.higher(f"webhooks/s, {name} outbox", rate)
        figures.lower(f"transition -> webhook p99 ms, {name} outbox", h99)
    if "redis" not in results:
        print("\n(redis-server is not installed: the fleet's outbox was not measured)")
    if args.json is not None:
        figures.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
