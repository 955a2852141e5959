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
per second. Meanwhile messages are appended straight at gptme (``--appends``
a second, to conversations at random): a poll sent more than
``STALE_AFTER`` after gptme answered an append that does not show it is a
stale read. Printed per path: polls answered per second, p50 and p99
latency, non-200 answers, the upstream GETs per second (the sidecar's
metric of enrich requests sent upstream) and their share of the polls,
stale reads of those checked, and the sidecar's CPU time per second per
1,000 polls/s. The large run, cache on only (gptme alone could not
answer it), goes first, before the direct path overloads gptme: ``--many``
pollers (2,000) over ``--many-conversations`` (200), with ``--many-appends``
a second.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
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

from sidecar.config import Settings  # noqa: E402
from tests.real import servers  # noqa: E402

#: 40 messages: about 64 KiB as gptme serves them (it sends the log twice,
#: as ``log`` and in ``branches``).
MESSAGES = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "x" * 700}
    for i in range(40)
]


#: A poll sent this long after an append was answered by gptme must show it
#: (the event's way from gptme to the sidecar); one that does not is stale.
STALE_AFTER = 0.05


class Appends:
    """Messages appended straight at gptme during the run (no request goes
    through the sidecar), each numbered, and when gptme answered it."""

    def __init__(self) -> None:
        #: Every append answered, per conversation: (when, its number).
        self.history: dict[str, list[tuple[float, int]]] = {}
        self.count = 0
        self.checked = 0
        self.stale = 0

    async def run(
        self, upstream: str, conversations: list[str], per_s: float, start: float, end: float
    ) -> None:
        if per_s <= 0:
            return
        async with aiohttp.ClientSession() as http:
            due = start
            while True:
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                if time.monotonic() >= end:
                    return
                cid = random.choice(conversations)
                self.count += 1
                number = self.count
                url = f"{upstream}/api/v2/conversations/{cid}"
                message = {"role": "user", "content": f"appended {number} at gptme"}
                async with http.post(url, json=message) as resp:
                    await resp.read()
                    if resp.status == 200:
                        answered = time.monotonic()
                        self.history.setdefault(cid, []).append((answered, number))
                due += 1.0 / per_s

    def check_shown(self, cid: str, sent: float, shown: int) -> None:
        """A poll of ``cid`` sent at ``sent`` that showed appends up to
        ``shown``: stale if an append answered STALE_AFTER before is missing."""
        due = [n for at, n in self.history.get(cid, ()) if at + STALE_AFTER <= sent]
        if not due:
            return
        self.checked += 1
        if max(due) > shown:
            self.stale += 1


#: An append's text carries its number: a poll's body shows the appends it has.
MARKER = re.compile(rb"appended (\d+) at gptme")


def poll_slice(
    base: str,
    conversations: list[str],
    indices: list[int],
    start: float,
    end: float,
) -> list[tuple[str, float, float, int, int]]:
    """Pollers ``indices`` in a process of their own (a large run's clients
    would be many machines; one Python process would be the bottleneck):
    each poll as (conversation, sent, latency, status, highest append shown)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # A forked poller would otherwise walk its parent's whole heap at each
    # full collection (every page copied on write: pauses of 100-250 ms here,
    # the client's, not the sidecar's): the inherited objects are frozen.
    gc.freeze()
    records: list[tuple[str, float, float, int, int]] = []

    async def poller(i: int) -> None:
        cid = conversations[i % len(conversations)]
        url = f"{base}/api/v2/conversations/{cid}"
        connector = aiohttp.TCPConnector(limit=1, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as http:
            due = time.monotonic() + random.random()
            while True:
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                sent = time.monotonic()
                if sent >= end:
                    return
                async with http.get(url) as resp:
                    body = await resp.read()
                    status = resp.status
                took = time.monotonic() - sent
                if sent >= start:
                    # Appends go at the log's end: the last one shown is the highest.
                    at = body.rfind(b"appended ")
                    found = MARKER.match(body, at) if at >= 0 else None
                    shown = int(found.group(1)) if found else 0
                    records.append((cid, sent, took, status, shown))
                due += 1.0

    async def every() -> None:
        await asyncio.gather(*(poller(i) for i in indices))

    asyncio.run(every())
    return records


async def upstream_gets(http: aiohttp.ClientSession, sidecar: str) -> float:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(sidecar + "/_sidecar/metrics", headers=auth) as resp:
        text = await resp.text()
    m = re.search(
        r'^sidecar_upstream_latency_seconds_count\{kind="enrich"\} ([\d.e+]+)$', text, re.M
    )
    return float(m.group(1)) if m else 0.0


async def warm(base: str, conversations: list[str], cached: bool) -> None:
    """Each conversation read until gptme answered it (and, through a caching
    sidecar, until its stream is live and the answer stored), so the run
    measures the steady state: its upstream GETs are the expiries and the
    appends, not each conversation's first read."""
    deadline = time.monotonic() + 60.0
    async with aiohttp.ClientSession() as http:
        for cid in conversations:
            while True:
                async with http.get(f"{base}/api/v2/conversations/{cid}") as resp:
                    await resp.read()
                    status = resp.headers.get("Cache-Status", "")
                    if resp.status == 200 and (not cached or "stored" in status or "hit" in status):
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench/gptme.py: {cid} was not cached within 60 s")
                await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)


async def in_processes(
    base: str,
    conversations: list[str],
    count: int,
    start: float,
    end: float,
    appends: Appends,
    processes: int = 4,
) -> tuple[int, list[float], int]:
    """``count`` pollers in ``processes`` processes (see poll_slice): the
    answers in the measured window, their latencies (s), non-200 answers."""
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        slices = [
            loop.run_in_executor(
                pool, poll_slice, base, conversations, list(range(k, count, processes)), start, end
            )
            for k in range(processes)
        ]
        results = await asyncio.gather(*slices)
    latencies: list[float] = []
    errors = 0
    for records in results:
        for cid, sent, took, status, shown in records:
            latencies.append(took)
            if status != 200:
                errors += 1
            else:
                appends.check_shown(cid, sent, shown)
    return len(latencies), latencies, errors


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    base: str,
    upstream: str,
    pid: int | None,
    conversations: list[str],
    pollers_count: int,
    appends_per_s: float,
    args: argparse.Namespace,
    cached: bool = False,
) -> dict[str, float]:
    """One path under ``pollers_count`` pollers, with appends at gptme;
    ``pid``: the sidecar's (None: direct); ``cached``: its cache is on."""
    await warm(base, conversations, cached)
    appends = Appends()
    warmup = 1.0 if pollers_count < 1000 else 3.0
    async with aiohttp.ClientSession() as http:
        before = await upstream_gets(http, base) if pid else 0.0
        counted_from = time.monotonic()
        cpu_before = cpu_seconds(pid) if pid else 0.0
        start = time.monotonic() + warmup
        appending = asyncio.create_task(
            appends.run(upstream, conversations, appends_per_s, start, start + args.duration)
        )
        # The large run's clients in four processes (one would be its bottleneck).
        answered, latencies, errors = await in_processes(
            base,
            conversations,
            pollers_count,
            start,
            start + args.duration,
            appends,
            processes=4 if pollers_count >= 1000 else 1,
        )
        await appending
        cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
        after = await upstream_gets(http, base) if pid else 0.0
        counted_for = time.monotonic() - counted_from
    latencies.sort()
    rate = answered / args.duration
    # The upstream GETs of the whole run (its warm-up included) over the time
    # they were counted in.
    upstream_rate = (after - before) / counted_for if pid else rate
    return {
        "polls/s": rate,
        "p50 ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99 ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000 if latencies else 0,
        "errors": errors,
        "upstream GETs/s": upstream_rate,
        "appends": appends.count,
        "checked": appends.checked,
        "stale": appends.stale,
        # CPU seconds per second of the whole window, per 1,000 polls/s.
        "cpu per 1k": (cpu / (args.duration + warmup)) / (rate / 1000) if pid and rate else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per path")
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument(
        "--appends", type=float, default=0.5, help="messages appended at gptme per second"
    )
    parser.add_argument(
        "--many", type=int, default=2000, help="pollers of the large run, cache on (0: none)"
    )
    parser.add_argument("--many-conversations", type=int, default=200)
    parser.add_argument("--many-appends", type=float, default=1.0)
    parser.add_argument(
        "--cache-max-age",
        type=float,
        default=Settings.cache_max_age,
        help=f"the cache-on sidecar's cache_max_age ({Settings.cache_max_age:g}: its default)",
    )
    parser.add_argument(
        "--cache-stale-while-revalidate",
        type=float,
        default=Settings.cache_stale_while_revalidate,
        help=f"its cache_stale_while_revalidate ({Settings.cache_stale_while_revalidate:g}: its "
        "default); a change made without an event"
        " is seen up to the sum of the two late",
    )
    parser.add_argument(
        "--upstream-nice",
        type=int,
        default=0,
        help="run gptme at this nice value (10: its CPU bursts yield to the sidecar and the "
        "clients, as a pod's upstream has CPU of its own); 0: as any process",
    )
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
    gptme = servers.start_gptme("0.31.0", model.url, nice=args.upstream_nice)
    many: dict[str, float] | None = None
    try:

        def fresh(prefix: str, count: int) -> list[str]:
            """Conversations of its own for each path: gptme 0.31.0 rewrites a
            conversation's config.toml at every GET, and concurrent GETs (the
            direct path's) can leave it unreadable, its GETs a 500 for good."""
            made = [f"{prefix}-{i}" for i in range(count)]
            for cid in made:
                gptme.seed_gptme_conversation(cid, MESSAGES)
            return made

        sample = fresh("sample", 1)[0]
        off, on = free_port(), free_port()
        off_proc = procs.start_sidecar(gptme.port, off, "--store", "memory")
        on_proc = procs.start_sidecar(
            gptme.port, on, "--store", "memory", "--cache", "events",
            "--cache-max-age", f"{args.cache_max_age:g}",
            "--cache-stale-while-revalidate", f"{args.cache_stale_while_revalidate:g}",
        )  # fmt: skip
        wait_port(off)
        wait_port(on)
        path = f"/api/v2/conversations/{sample}"
        with urllib.request.urlopen(gptme.url + path) as resp:
            size = len(resp.read())
        print(
            f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}"
        )
        print(
            f"gptme-server 0.31.0, {args.conversations} conversations of {len(MESSAGES)} messages"
            f" ({size / 1024:.0f} KiB as served), {args.pollers} pollers at 1 GET/s each,"
            f" {args.appends:g} messages/s appended straight at gptme,"
            f" {args.duration:g} s measured per path"
            + (f"; gptme at nice {args.upstream_nice}" if args.upstream_nice else "")
            + "\n"
        )

        def run(base: str, pid: int | None, prefix: str, cached: bool = False) -> dict[str, float]:
            conversations = fresh(prefix, args.conversations)
            return asyncio.run(
                measure(
                    base, gptme.url, pid, conversations, args.pollers, args.appends, args, cached
                )
            )

        # The large run first: the direct path and the cache-off one overload
        # gptme (it answers about 90 of the 200 polls a second), and a gptme
        # still working through that backlog would weigh on its p99.
        if args.many:
            more = fresh("many", args.many_conversations)
            many = asyncio.run(
                measure(
                    f"http://127.0.0.1:{on}",
                    gptme.url,
                    on_proc.pid,
                    more,
                    args.many,
                    args.many_appends,
                    args,
                    cached=True,
                )
            )
        results = {
            "direct": run(gptme.url, None, "direct"),
            "sidecar, cache off": run(f"http://127.0.0.1:{off}", off_proc.pid, "off"),
            "sidecar, cache on": run(f"http://127.0.0.1:{on}", on_proc.pid, "on", cached=True),
        }
    finally:
        procs.stop()
        gptme.stop()
        model.stop()
    head = (
        f"{'path':<19} | {'polls/s':>7} | {'p50 ms':>6} | {'p99 ms':>6} | {'non-200':>7} "
        f"| {'upstream GETs/s':>15} | {'share':>6} | {'stale/checked':>13} | CPU/1k polls/s"
    )
    print(head)
    print("-" * len(head))
    rows = dict(results)
    if many is not None:
        rows[f"{args.many} pollers, on"] = many
    for name, r in rows.items():
        share = r["upstream GETs/s"] / r["polls/s"] if r["polls/s"] else float("nan")
        cpu = f"{r['cpu per 1k']:.2f} s/s" if r["cpu per 1k"] else ""
        print(
            f"{name:<19} | {r['polls/s']:>7.1f} | {r['p50 ms']:>6.1f} | {r['p99 ms']:>6.1f} "
            f"| {int(r['errors']):>7} | {r['upstream GETs/s']:>15.1f} | {share:>6.1%} "
            f"| {int(r['stale']):>5}/{int(r['checked']):<7} | {cpu}"
        )
    on_r = results["sidecar, cache on"]
    share = on_r["upstream GETs/s"] / on_r["polls/s"] if on_r["polls/s"] else 1.0
    print("\nfigure (cache on, in front of gptme 0.31.0)   | measured      | target")
    print("-" * 78)
    checks = [
        (
            f"{args.pollers} pollers: polls answered per second",
            f"{on_r['polls/s']:.1f}",
            f">= {0.95 * args.pollers:g}",
            on_r["polls/s"] >= 0.95 * args.pollers,
        ),
        (f"{args.pollers} pollers: p99", f"{on_r['p99 ms']:.1f} ms", "< 5 ms", on_r["p99 ms"] < 5),
        (f"{args.pollers} pollers: upstream GETs / polls", f"{share:.1%}", "<= 2%", share <= 0.02),
        (f"{args.pollers} pollers: stale reads", f"{int(on_r['stale'])}", "0", not on_r["stale"]),
    ]
    if many is not None:
        many_share = many["upstream GETs/s"] / many["polls/s"] if many["polls/s"] else 1.0
        checks += [
            (
                f"{args.many} pollers: polls answered per second",
                f"{many['polls/s']:.1f}",
                f">= {0.95 * args.many:g}",
                many["polls/s"] >= 0.95 * args.many,
            ),
            (
                f"{args.many} pollers: p99",
                f"{many['p99 ms']:.1f} ms",
                "< 20 ms",
                many["p99 ms"] < 20,
            ),
            (
                f"{args.many} pollers: upstream GETs / polls",
                f"{many_share:.1%}",
                "<= 2%",
                many_share <= 0.02,
            ),
            (f"{args.many} pollers: stale reads", f"{int(many['stale'])}", "0", not many["stale"]),
            (
                f"{args.many} pollers: sidecar CPU per 1,000 polls/s",
                f"{many['cpu per 1k']:.2f} s/s",
                "",
                True,
            ),
        ]
    for name, value, target, ok in checks:
        mark = "" if not target else ("  ok" if ok else "  MISSED")
        print(f"{name:<46} | {value:>13} | {target}{mark}")
    # Each conversation's answer is asked for again once per cache_max_age
    # (in the background), whatever the events say: the share's floor.
    print(
        f"\ncache_max_age {args.cache_max_age:g} s, cache_stale_while_revalidate "
        f"{args.cache_stale_while_revalidate:g} s (a change made without an event seen up to "
        f"{args.cache_max_age + args.cache_stale_while_revalidate:g} s late): "
        "the expiry alone asks gptme for each "
        f"conversation every {args.cache_max_age:g} s, a floor of "
        f"{args.conversations / args.cache_max_age / args.pollers:.1%} of the polls with "
        f"{args.pollers} pollers over {args.conversations} conversations"
        + (
            f", {args.many_conversations / args.cache_max_age / args.many:.1%} with {args.many}"
            f" over {args.many_conversations}"
            if args.many
            else ""
        )
        + "; each append adds one GET (the next poll of its conversation)."
    )
    if args.json is not None:
        figures = Figures()
        for name in ("sidecar, cache off", "sidecar, cache on"):
            figures.lower(f"gptme 0.31.0, {name}, p50 ms", results[name]["p50 ms"])
            figures.lower(f"gptme 0.31.0, {name}, p99 ms", results[name]["p99 ms"])
        figures.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
