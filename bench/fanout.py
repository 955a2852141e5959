"""Fan-out: clients per conversation vs upstream streams, event -> client p99, memory per client.

    python bench/fanout.py [--events 200] [--interval 0.02]

Starts the fake gptme upstream (in this process), the sidecar (a process of
its own, `sidecar serve`), and the clients (four more processes: this script
with ``--clients``). For 1, 10 and 100 clients on one conversation, with
fan-out on and off, it prints the upstream's streams for that conversation
(the fake's count of its subscribers); with fan-out on, the p99 from the
upstream writing an event to each client reading it (the fake stamps each
event with ``time.monotonic()``, one clock for every process on the
machine); and the sidecar's resident memory per fanned-out client (its RSS
before and after 1,000 clients connect). Target: 100 clients at <= 5 ms p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sidecar.core.sse import EventDecoder
from sidecar.demo.fake import FakeGptme

ROOT = Path(__file__).resolve().parent.parent
CID = "bench-fanout"
EVENTS = f"/api/v2/conversations/{CID}/events"
PROCS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------- the clients
async def clients(base: str, n: int, expect: int) -> None:
    """Connect ``n`` clients, say so on stdout, read ``expect`` stamped
    events on each, then print every latency (ms) as one JSON line."""
    latencies: list[float] = []
    connected = 0
    ready = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:

        async def one() -> None:
            nonlocal connected
            async with http.get(base + EVENTS) as resp:
                assert resp.status == 200, resp.status
                decoder = EventDecoder()
                got = 0
                first = True
                async for chunk in resp.content.iter_any():
                    now = time.monotonic()
                    for sse in decoder.feed(chunk):
                        if first:
                            first = False
                            connected += 1
                            if connected == n:
                                ready.set()
                        data = json.loads(sse.data)
                        if "t" in data:
                            latencies.append((now - data["t"]) * 1000)
                            got += 1
                    if got >= expect:
                        return

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.wait_for(ready.wait(), 60)
        print("ready", flush=True)
        if expect:
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        else:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            for task in tasks:
                task.cancel()
    print(json.dumps(latencies), flush=True)


# ------------------------------------------------------------------ a run
class Bench:
    def __init__(self, fake: FakeGptme, base: str, sidecar: subprocess.Popen[bytes]) -> None:
        self.fake = fake
        self.base = base
        self.sidecar = sidecar

    def start_clients(self, n: int, expect: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, __file__, "--clients", str(n), "--expect", str(expect), self.base],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def wait_line(self, proc: subprocess.Popen[str], timeout: float = 60) -> str:
        assert proc.stdout is not None
        line = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline), timeout
        )
        if not line:
            raise RuntimeError("the clients' process ended early")
        return line.strip()

    async def run(self, n: int, events: int, interval: float) -> tuple[int, list[float]]:
        # The clients in up to PROCS processes: one process's own reading of
        # 100 streams would be most of what is measured.
        sizes = [n // PROCS + (1 if i < n % PROCS else 0) for i in range(min(n, PROCS))]
        procs = [self.start_clients(size, events) for size in sizes]
        try:
            for proc in procs:
                assert await self.wait_line(proc) == "ready"
            await asyncio.sleep(0.2)
            streams = self.fake.subscriber_count(CID)
            for i in range(events):
                self.fake.broadcast(CID, {"type": "message_added", "i": i, "t": time.monotonic()})
                await asyncio.sleep(interval)
            latencies = []
            for proc in procs:
                latencies += json.loads(await self.wait_line(proc, 120))
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        return streams, latencies

    async def memory(self, n: int) -> float:
        """KiB of the sidecar's RSS per fanned-out client."""
        before = rss_kib(self.sidecar.pid)
        proc = self.start_clients(n, 0)
        try:
            assert await self.wait_line(proc) == "ready"
            await asyncio.sleep(1.0)
            after = rss_kib(self.sidecar.pid)
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            await self.wait_line(proc)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        return (after - before) / n


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def start_sidecar(upstream: str, fan_out: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before anything is timed)
        [
            sys.executable, "-m", "sidecar", "serve",
            "--upstream", upstream, "--host", "127.0.0.1", "--port", str(port),
            "--store", "memory", "--log-level", "warning",
            "--fan-out" if fan_out else "--no-fan-out",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base}/api/v2/conversations/{CID}") as resp:
                    body = await resp.json()
                    if resp.status == 200 and body["session"]["stream"] == "live":
                        return proc, base
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the sidecar did not come up")
            await asyncio.sleep(0.1)


async def main(events: int, interval: float) -> None:
    fake = FakeGptme("0.31.0")
    server = TestServer(fake.app, host="127.0.0.1")
    await server.start_server()
    upstream = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        body = {"prompt": "p", "messages": [{"role": "user", "content": "hello"}]}
        async with http.put(f"{upstream}/api/v2/conversations/{CID}", json=body) as resp:
            assert resp.status == 200
    try:
        for fan_out in (True, False):
            sidecar, base = await start_sidecar(upstream, fan_out)
            try:
                bench = Bench(fake, base, sidecar)
                print(f"fan_out = {str(fan_out).lower()}")
                for n in (1, 10, 100):
                    streams, latencies = await bench.run(n, events, interval)
                    line = f"  {n:>3} clients: {streams:>3} upstream streams"
                    line += f" (clients per stream {n / streams:.1f})"
                    if fan_out:
                        ok = "ok" if n < 100 or p99(latencies) <= 5 else "MISSED"
                        line += (
                            f", event -> client p50 {sorted(latencies)[len(latencies) // 2]:.2f} ms"
                            f" p99 {p99(latencies):.2f} ms"
                            f" ({len(latencies)} deliveries)"
                            + (f" [target 100 clients <= 5 ms p99: {ok}]" if n == 100 else "")
                        )
                    print(line, flush=True)
                if fan_out:
                    per = await bench.memory(1000)
                    print(f"  memory: {per:.1f} KiB of sidecar RSS per fanned-out client (1,000)")
            finally:
                sidecar.terminate()
                sidecar.wait(10)
    finally:
        await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("base", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients:
        asyncio.run(clients(args.base, args.clients, args.expect))
    else:
        asyncio.run(main(args.events, args.interval))
