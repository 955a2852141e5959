"""A list of 100 conversations merged: the time it adds to each answer, against the upstream's own.

    make bench            # or: python bench/lists.py [--requests 300] [--rounds 3]

Two upstreams, each asked for its list of 100 conversations directly and
through the sidecar (one keep-alive connection, one request at a time, so
nothing queues; paths measured in turn, ``--rounds`` times, medians of the
rounds):

* the fast bench upstream (``bench/upstream.py``): a prebuilt gptme
  0.35.1-shaped list (100 items, about 60 KiB), so what is measured is the
  sidecar's own cost;
* the real gptme-server 0.31.0 (installed as for the conformance suite),
  holding 100 conversations on disk, as its users would see it.

Through the sidecar: the same bytes on a path it only passes through (what
any proxying costs), the list with none of the 100 observed (parsed,
nothing merged: the upstream's bytes go out), and with all 100 observed
(each read once first: streams live, every item merged). Printed: p50 and p99 per path,
the time added per answer (p50 through the sidecar minus p50 direct) and
that as a share of the upstream's own time. Then, in this process, the
merge alone of the same 100-item body against ``orjson.loads`` +
``orjson.dumps`` of it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from merge_cost import per_call  # noqa: E402
from run import Figures, Processes, free_port, wait_port  # noqa: E402
from upstream import LISTED, listing  # noqa: E402

from tests.real import servers  # noqa: E402

MESSAGES = [{"role": "user", "content": "please run the tests"}] * 4


async def timed(url: str, requests: int) -> list[float]:
    """Seconds per answer of ``requests`` GETs, one after the other, on one connection."""
    out = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        for _ in range(3):  # warm: the connection, the caches
            async with http.get(url) as resp:
                await resp.read()
        for _ in range(requests):
            started = time.perf_counter()
            async with http.get(url) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            out.append(time.perf_counter() - started)
    return out


async def observe_all(base: str, ids: list[str]) -> None:
    async with aiohttp.ClientSession() as http:
        for cid in ids:
            async with http.get(f"{base}/api/v2/conversations/{cid}") as resp:
                await resp.read()
        for _ in range(200):
            async with http.get(f"{base}/api/v2/conversations") as resp:
                await resp.read()
                if resp.headers.get("Sidecar-Enriched") == str(len(ids)):
                    return
            await asyncio.sleep(0.05)
    raise SystemExit("the sidecar did not observe every conversation")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def measure(paths: dict[str, str], requests: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per path, the median over rounds of its p50 and p99 (ms)."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, url in paths.items():
            took = asyncio.run(timed(url, requests))
            runs[name].append((statistics.median(took) * 1000, p99(took) * 1000))
    return {
        name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
        for name, rs in runs.items()
    }


def table(title: str, results: dict[str, tuple[float, float]], figures: Figures) -> None:
    direct = results["direct"][0]
    print(f"\n{title}")
    head = (
        f"{'path':<30} | {'p50 ms':>8} | {'p99 ms':>8} | {'added p50 ms':>12} | {'added / own':>11}"
    )
    print(head)
    print("-" * len(head))
    for name, (p50, p99_ms) in results.items():
        added = p50 - direct
        share = f"{added / direct:>10.1%}" if name != "direct" else f"{'':>10}"
        cell = f"{added:>12.3f}" if name != "direct" else f"{'':>12}"
        print(f"{name:<30} | {p50:>8.3f} | {p99_ms:>8.3f} | {cell} | {share}")
        if name != "direct":
            figures.lower(f"{title}, {name}, added p50 ms", added)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="GETs per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/ab.py)")
    args = parser.parse_args()
    try:
        servers.require(servers.gptme_dir("0.31.0"), "gptme-server 0.31.0")
    except servers.NotInstalled as exc:
        print(f"bench/lists.py: {exc} (python -m tests.real.servers install)")
        return 2
    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; {args.requests} GETs per path per round, "
        f"{args.rounds} rounds, medians"
    )
    figures = Figures()
    procs = Processes()
    model = servers.start_model()
    gptme = servers.start_gptme("0.31.0", model.url)
    try:
        up = free_port()
        procs.start(sys.executable, str(HERE / "upstream.py"), "--port", str(up))
        wait_port(up)
        sidecars = {}
        for name, port in (("fast none", up), ("fast all", up), ("gptme none", gptme.port),
                           ("gptme all", gptme.port)):  # fmt: skip
            sidecars[name] = free_port()
            procs.start_sidecar(port, sidecars[name], "--store", "memory")
        for port in sidecars.values():
            wait_port(port)
        ids = [f"bench-{i:03d}" for i in range(LISTED)]
        for cid in ids:
            gptme.seed_gptme_conversation(cid, MESSAGES)
        asyncio.run(
            observe_all(
                f"http://127.0.0.1:{sidecars['fast all']}", [f"l{i}" for i in range(LISTED)]
            )
        )
        asyncio.run(observe_all(f"http://127.0.0.1:{sidecars['gptme all']}", ids))
        listed = "/api/v2/conversations"
        fast = measure(
            {
                "direct": f"http://127.0.0.1:{up}{listed}",
                "sidecar, passed through": f"http://127.0.0.1:{sidecars['fast none']}/plain-list",
                "sidecar, none observed": f"http://127.0.0.1:{sidecars['fast none']}{listed}",
                "sidecar, all 100 observed": f"http://127.0.0.1:{sidecars['fast all']}{listed}",
            },
            args.requests,
            args.rounds,
        )
        query = f"{listed}?limit={LISTED}"
        real = measure(
            {
                "direct": f"{gptme.url}{query}",
                "sidecar, none observed": f"http://127.0.0.1:{sidecars['gptme none']}{query}",
                "sidecar, all 100 observed": f"http://127.0.0.1:{sidecars['gptme all']}{query}",
            },
            max(30, args.requests // 5),
            args.rounds,
        )
    finally:
        procs.stop()
        gptme.stop()
        model.stop()
    table(f"bench upstream, a list of {LISTED} (gptme 0.35.1-shaped)", fast, figures)
    table(f"gptme-server 0.31.0, a list of {LISTED}", real, figures)
    in_process(figures)
    if args.json is not None:
        figures.write(args.json)
    return 0


def in_process(figures: Figures) -> None:
    """The merge alone, in this process, against a JSON round trip of the same body."""
    import orjson

    from sidecar.core.merge import merge_list, read_list
    from sidecar.core.snapshot import Snapshot

    body = listing(LISTED)
    snap = Snapshot(status="failed", last_error="Error code: 401", stream="live", updated_at=1.0)
    every = {f"l{i}": snap for i in range(LISTED)}
    merged = per_call(lambda: merge_list(read_list(body, "conversations"), "session", "id", every))
    none = per_call(lambda: merge_list(read_list(body, "conversations"), "session", "id", {}))
    base = per_call(lambda: orjson.dumps(orjson.loads(body)))
    print(f"\nin this process, the {len(body) / 1024:.0f} KiB list of {LISTED}:")
    print(f"  merge, all observed  {merged * 1e6:8.1f} µs  ({merged / base:.2f}x loads+dumps)")
    print(f"  merge, none observed {none * 1e6:8.1f} µs  ({none / base:.2f}x loads+dumps)")
    print(f"  orjson loads+dumps   {base * 1e6:8.1f} µs")
    figures.lower("list merge of 100, all observed / loads+dumps", merged / base)


if __name__ == "__main__":
    sys.exit(main())
