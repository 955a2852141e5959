"""Memory and time under abuse: a real sidecar process, as deployed.

    python bench/abandon.py [--rounds 4]

Starts the fake gptme (0.31.0) and a sidecar process in front of it, then:

* times a GET of a conversation with a 16,000-byte pathological
  ``If-None-Match`` against the same GET without it (best of 20 and of 5);
* lets clients abandon 1 MiB enriched answers, 200 a round, and prints the
  sidecar's resident memory after each round against its baseline (the heap
  trimmer returns memory within ~2 s; no garbage collection is forced).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sidecar.demo.fake import FakeGptme


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def abandon(port: int, path: str) -> None:
    """Ask for a large answer, take its first bytes, and leave."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.read(1024)
    writer.transport.abort()


async def main(rounds: int) -> None:
    fake = FakeGptme("0.31.0")
    runner = web.AppRunner(fake.app)
    await runner.setup()
    up_port, port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sidecar", "--upstream", f"http://127.0.0.1:{up_port}"),
        *("--port", str(port), "--store", "memory", "--log-level", "warning"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(base + "/_sidecar/healthz"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            for cid in ("small", "big"):
                async with http.put(f"{base}/api/v2/conversations/{cid}", json={"prompt": "p"}):
                    pass
            fake.conversations["big"].log = [{"role": "user", "content": "x" * (1024 * 1024)}]

            async def timed(headers: dict[str, str]) -> float:
                started = time.perf_counter()
                async with http.get(base + "/api/v2/conversations/small", headers=headers) as r:
                    await r.read()
                return (time.perf_counter() - started) * 1000

            plain = min([await timed({}) for _ in range(20)])
            hostile = {"If-None-Match": "a" + " " * 16000 + "x", "Prefer": "wait=0.01"}
            worst = min([await timed(hostile) for _ in range(5)])
            print(f"GET: plain {plain:.2f} ms; with a 16,000-byte pathological If-None-Match "
                  f"{worst:.2f} ms ({worst / plain:.2f}x)")  # fmt: skip

            path = "/api/v2/conversations/big"
            for _ in range(5):
                await abandon(port, path)  # warm up
            await asyncio.sleep(2.5)
            baseline = rss_mib(proc.pid)
            print(f"sidecar RSS at rest: {baseline:.1f} MiB")
            for n in range(1, rounds + 1):
                for _ in range(10):
                    await asyncio.gather(*(abandon(port, path) for _ in range(20)))
                await asyncio.sleep(2.5)  # the heap trimmer's period, and a margin
                now = rss_mib(proc.pid)
                print(f"after {200 * n} abandoned 1 MiB answers: {now:.1f} MiB "
                      f"({now / baseline:.2f}x, target <= 1.10x)")  # fmt: skip
    finally:
        proc.terminate()
        await proc.wait()
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args().rounds))
