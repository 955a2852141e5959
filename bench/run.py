"""The performance benchmark: the sidecar against nginx and a direct path, in one run.

    make bench            # or: python bench/run.py [--duration 5] [--connections 32]

The upstream is not the ceiling: nginx (one worker, a process of its own)
serves the conversation bodies as static files, and passes what needs events
(the streams, the control endpoints, other ids) to bench/upstream.py. In
front of it, all on 127.0.0.1: nginx as a proxy (one worker, keep-alive,
buffering on: its defaults) and the sidecar, one process each: as it was
before the response cache (``--baseline``, a git revision, run from an
archive of it), as it is with the cache off (the default), and with
``--cache events``. wrk measures requests per second, p50 and p99 for a
plain proxied GET and the enrich GET, at 2 KiB, 64 KiB and 1 MiB; the
sidecar's rows are measured alternately in ``--rounds`` rounds (medians),
so before / after is an A/B of the same run. Then: events per second one
sidecar ingests while serving polls, event-to-visible latency, resident
memory per idle subscription at 2,000 subscriptions, and the merge alone.
Last, the SQLite store on and off: the enrich GET and ingest, alternately.
Every figure is printed with its baseline from the same run and the target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
#: Metrics are served only with a token; the bench reads them.
ADMIN_TOKEN = "bench"

from merge_cost import conversation, per_call  # noqa: E402
from upstream import SIZES as UPSTREAM_SIZES  # noqa: E402
from upstream import conversation as upstream_body  # noqa: E402

from sidecar.core.merge import merge  # noqa: E402
from sidecar.core.snapshot import Snapshot  # noqa: E402

SIZES = ("c2k", "c64k", "c1m")
LABELS = {"c2k": "2 KiB", "c64k": "64 KiB", "c1m": "1 MiB"}

#: nginx with one worker, every path under the run's temporary directory;
#: each bench adds its ``http`` block's upstreams and server.
NGINX_HEAD = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
"""
#: nginx as the proxy under comparison (in front of the static upstream).
NGINX_CONF = (
    NGINX_HEAD
    + """    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
}}
"""
)
#: The upstream: the bodies as static files; the rest from bench/upstream.py.
STATIC_CONF = (
    NGINX_HEAD
    + """    upstream events {{ server 127.0.0.1:{events}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/static;
        default_type application/json;
        location / {{
            try_files $uri @app;
        }}
        location @app {{
            proxy_pass http://events;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""
)
#: The sidecar before the response cache, for the A/B of the cache off.
BASELINE = "99efb92"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listened on port {port}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wrk(url: str, duration: float, connections: int) -> tuple[float, float, float]:
    """Requests/s, p50 and p99 latency in ms."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    if re.search(r"Non-2xx|Socket errors", out):
        print(f"  warning: wrk reported errors for {url}:\n{out}", file=sys.stderr)
    return rps, pct("50"), pct("99")


def check_source(source: Path, env: dict[str, str]) -> None:
    """Fail unless a sidecar started with ``env`` in ``source`` imports the
    package found there (and not this tree's, or an installed one)."""
    found = subprocess.run(
        [sys.executable, "-c", "import sidecar; print(sidecar.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=source,
        check=False,
    ).stdout.strip()
    if not found or not Path(found).resolve().is_relative_to(source.resolve()):
        raise SystemExit(f"the sidecar to compare imports {found or 'nothing'}, not {source}")


class Processes:
    """Child processes, stopped in reverse order (killed if they linger)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *cmd: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def start_sidecar(
        self, upstream_port: int, port: int, *extra: str, source: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """The sidecar as a real process, in front of the upstream on that port
        (``source``: a directory holding another version of the package; by
        default $BENCH_SIDECAR_SOURCE, which bench/ab.py sets, or this tree)."""
        if source is None and os.environ.get("BENCH_SIDECAR_SOURCE"):
            source = Path(os.environ["BENCH_SIDECAR_SOURCE"])
        cmd = (
            sys.executable, "-m", "sidecar", "--upstream", f"http://127.0.0.1:{upstream_port}",
            "--port", str(port), "--log-level", "warning", "--admin-token", ADMIN_TOKEN, *extra,
        )  # fmt: skip
        if source is None:
            return self.start(*cmd)
        # `python -m` puts the working directory first on sys.path, before
        # PYTHONPATH: run from this tree, the other version would import this
        # tree's package, and a comparison would measure this code twice.
        env = {**os.environ, "PYTHONPATH": str(source)}
        check_source(source, env)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=source
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def get_metric(http: aiohttp.ClientSession, base: str, name: str) -> float:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(base + "/_sidecar/metrics", headers=auth) as resp:
        text = await resp.text()
    m = re.search(rf"^{re.escape(name)} ([\d.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def ingest(
    sidecar: str, upstream: str, duration: float, connections: int
) -> tuple[float, float]:
    """Events/s ingested by the sidecar while wrk polls it, and the polls' rps."""
    async with aiohttp.ClientSession() as http:
        async with http.get(sidecar + "/api/v2/conversations/burst") as resp:
            await resp.read()
        await asyncio.sleep(0.5)
        n = 300_000
        name = 'sidecar_events_total{type="generation_progress"}'
        before = await get_metric(http, sidecar, name)
        poll = asyncio.create_task(
            asyncio.to_thread(
                wrk, sidecar + "/api/v2/conversations/c2k", max(duration, 4), connections // 2
            )
        )
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        async with http.post(upstream + f"/control/burst?n={n}") as resp:
            await resp.read()
        # Another process's counter: there is nothing to await but its metrics.
        while await get_metric(http, sidecar, name) < before + n:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - started
        rps, _, _ = await poll
    return n / seconds, rps


async def latency(sidecar: str, upstream: str, samples: int) -> tuple[float, float]:
    """Event written upstream -> a held GET (``Prefer: wait``) through the sidecar answers (ms)."""
    url = sidecar + "/api/v2/conversations/latency"
    results = []
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            await resp.read()
        await asyncio.sleep(0.5)
        for _ in range(samples):
            async with http.get(url) as resp:
                etag = resp.headers["ETag"]
                await resp.read()
            held = asyncio.create_task(_held_get(http, url, etag))
            await asyncio.sleep(0.005)  # the GET is held by now
            async with http.post(upstream + "/control/emit") as resp:
                written = (await resp.json())["t"]
            results.append((await held - written) * 1000)
    results.sort()
    return statistics.median(results), results[max(0, int(len(results) * 0.99) - 1)]


async def _held_get(http: aiohttp.ClientSession, url: str, etag: str) -> float:
    headers = {"If-None-Match": etag, "Prefer": "wait=10"}
    async with http.get(url, headers=headers) as resp:
        await resp.read()
        return time.monotonic()


async def idle_memory(sidecar: str, pid: int, count: int, warm: int = 100) -> float:
    """Resident KiB per idle subscription: the growth from ``warm`` to ``warm + count``.

    Run against a sidecar that served nothing else, so no memory freed by
    earlier measurements is reused; the first ``warm`` subscriptions pay the
    one-time costs (imports, pools) and are not counted.
    """
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:

        async def open_range(start: int, stop: int) -> None:
            async def open_one(i: int) -> None:
                async with http.get(f"{sidecar}/api/v2/conversations/idle-{i}") as resp:
                    await resp.read()

            await asyncio.gather(*(open_one(i) for i in range(start, stop)))
            name = 'sidecar_subscriptions{stream="live"}'
            for _ in range(600):
                if await get_metric(http, sidecar, name) >= stop:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)

        await open_range(0, warm)
        before = rss_kib(pid)
        await open_range(warm, warm + count)
        after = rss_kib(pid)
    return (after - before) / count


def start_nginx(
    procs: Processes, nginx: str, tmp: Path, static: Path, ev_port: int, up_port: int, nx_port: int
) -> None:
    """nginx serving ``static`` (falling back to bench/upstream.py on ``ev_port``)
    on ``up_port``, and nginx as a proxy in front of it on ``nx_port``."""
    (tmp / "up").mkdir()
    (tmp / "up" / "nginx.conf").write_text(
        STATIC_CONF.format(tmp=tmp / "up", events=ev_port, port=up_port).replace(
            f"root {tmp / 'up'}/static", f"root {static}"
        )
    )
    procs.start(nginx, "-p", str(tmp / "up"), "-c", str(tmp / "up" / "nginx.conf"))
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, upstream=up_port, port=nx_port))
    procs.start(nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"))


def merge_ms(size_label: str) -> float:
    size = {"2 KiB": 2048, "64 KiB": 65536, "1 MiB": 1 << 20}[size_label]
    body = conversation(size, False)
    snap = Snapshot(status="failed", last_error="x", stream="live", updated_at=1.0)
    return per_call(lambda: merge(body, "session", snap)) * 1000


def _median(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        statistics.median(r[2] for r in runs),
    )


def _baseline_source(tmp: Path, revision: str) -> Path:
    """The sidecar package as it was at ``revision``, unpacked under ``tmp``."""
    where = tmp / "baseline"
    where.mkdir()
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", revision],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    parts = [part for part in ("sidecar", "config") if part in listed]  # config: the profiles
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, *parts], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--subscriptions", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="alternate runs of each sidecar")
    parser.add_argument(
        "--baseline", default=BASELINE, help="git revision of the sidecar to compare against"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/ab.py)")
    args = parser.parse_args()
    missing = [
        tool
        for tool in ("wrk", "nginx")
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if missing:
        print(
            f"bench needs {' and '.join(missing)}: apt-get update && apt-get install -y wrk nginx"
        )
        return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        baseline = _baseline_source(tmp, args.baseline)
        static = tmp / "static"
        for where in ("api/v2/conversations", "plain"):
            (static / where).mkdir(parents=True)
            for cid, size in UPSTREAM_SIZES.items():
                (static / where / cid).write_bytes(upstream_body(cid, size))
        for directory in (tmp, *static.rglob("*")):  # nginx's worker (nobody) reads them
            if directory.is_dir():
                directory.chmod(0o755)
        procs = Processes()
        ev_port, up_port, nx_port = free_port(), free_port(), free_port()
        ports = {"before": free_port(), "sidecar": free_port(), "cache on": free_port()}
        try:
            procs.start(sys.executable, str(HERE / "upstream.py"), "--port", str(ev_port))
            wait_port(ev_port)
            start_nginx(procs, nginx, tmp, static, ev_port, up_port, nx_port)
            sqlite = ("--store", f"sqlite:{tmp / 'state.db'}")
            procs.start_sidecar(
                up_port, ports["before"], "--store", f"sqlite:{tmp / 'before.db'}",
                source=baseline,
            )  # fmt: skip
            sidecar_proc = procs.start_sidecar(up_port, ports["sidecar"], *sqlite)
            procs.start_sidecar(
                up_port, ports["cache on"], "--store", f"sqlite:{tmp / 'cached.db'}",
                "--cache", "events",
            )  # fmt: skip
            for port in (up_port, nx_port, *ports.values()):
                wait_port(port)
            direct = f"http://127.0.0.1:{up_port}"
            via_nginx = f"http://127.0.0.1:{nx_port}"
            bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            sidecar = bases["sidecar"]
            for base in bases.values():  # open the subscriptions before measuring
                for cid in SIZES:
                    for _ in range(2):  # (the second answer is kept with the cache on)
                        subprocess.run(
                            ["curl", "-s", "-o", "/dev/null", f"{base}/api/v2/conversations/{cid}"],
                            check=False,
                        )
                    time.sleep(0.3)

            print(
                f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                f"Python {platform.python_version()}, sidecar event loop: {loop}"
            )
            print(
                f"wrk: 1 thread, {args.connections} connections, {args.duration:g} s per run; "
                f"the sidecar's rows: medians of {args.rounds} rounds, alternately; "
                f"'before': {args.baseline}\n"
            )
            head = (
                f"{'body':>7} {'request':<8} | {'path':<16} | {'req/s':>8} | {'p50 ms':>7} "
                f"| {'p99 ms':>7} | {'x nginx':>7}"
            )
            print(head)
            print("-" * len(head))
            ratios: dict[tuple[str, str, str], float] = {}
            everything: dict[tuple[str, str, str], tuple[float, float, float]] = {}
            for cid in SIZES:
                for kind, path in (
                    ("plain", f"/plain/{cid}"),
                    ("enrich", f"/api/v2/conversations/{cid}"),
                ):
                    measured = {
                        "direct": wrk(direct + path, args.duration, args.connections),
                        "nginx": wrk(via_nginx + path, args.duration, args.connections),
                    }
                    names = ["before", "sidecar"] + (["cache on"] if kind == "enrich" else [])
                    runs: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
                    for _ in range(args.rounds):
                        for name in names:
                            runs[name].append(
                                wrk(bases[name] + path, args.duration, args.connections)
                            )
                    for name in names:
                        measured[name] = _median(runs[name])
                        everything[(cid, kind, name)] = measured[name]
                    for name, (rps, p50, p99) in measured.items():
                        ratio = rps / measured["nginx"][0]
                        ratios[(cid, kind, name)] = ratio
                        label = {"sidecar": "sidecar", "before": "sidecar before"}.get(
                            name, "sidecar cache on" if name == "cache on" else name
                        )
                        print(
                            f"{LABELS[cid]:>7} {kind:<8} | {label:<16} | {rps:>8.0f} | "
                            f"{p50:>7.2f} | {p99:>7.2f} | {ratio:>7.2f}"
                        )
                    for name in names[1:]:
                        ratios[(cid, kind, name + "/before")] = (
                            measured[name][0] / measured["before"][0]
                        )
                print()

            # The hop itself: one connection, so nothing queues behind anything.
            hop: dict[str, tuple[float, float, float]] = {}
            for kind, path in (("plain", "/plain/c2k"), ("enrich", "/api/v2/conversations/c2k")):
                _, d50, d99 = wrk(direct + path, args.duration, 1)
                _, s50, s99 = wrk(sidecar + path, args.duration, 1)
                hop[kind] = ((s50 - d50) * 1000, d99 * 1000, s99 * 1000)
            events_per_s, poll_rps = asyncio.run(
                ingest(sidecar, direct, args.duration, args.connections)
            )
            p50, p99 = asyncio.run(latency(sidecar, direct, args.latency_samples))
            p99_visible = p99
            # The store: the same measures with it on (the sidecar above, its
            # SQLite file) and off (one with --store memory), alternately.
            mem_port = free_port()
            procs.start_sidecar(up_port, mem_port, "--store", "memory")
            wait_port(mem_port)
            in_memory = f"http://127.0.0.1:{mem_port}"
            for cid in SIZES:
                subprocess.run(
                    ["curl", "-s", "-o", "/dev/null", f"{in_memory}/api/v2/conversations/{cid}"],
                    check=False,
                )
            time.sleep(0.5)
            store_rows: list[tuple[str, float, float]] = []
            for cid in ("c2k", "c64k"):
                path = f"/api/v2/conversations/{cid}"
                on = wrk(sidecar + path, args.duration, args.connections)[0]
                off = wrk(in_memory + path, args.duration, args.connections)[0]
                store_rows.append((f"enrich GET {LABELS[cid]} req/s", on, off))
            ingest_off, _ = asyncio.run(ingest(in_memory, direct, args.duration, args.connections))
            store_rows.append(("ingest with polls running, ev/s", events_per_s, ingest_off))
            # Memory in a sidecar of its own: see idle_memory.
            sidecar_proc.terminate()
            sidecar_proc.wait(10)
            idle_port = free_port()
            idle_proc = procs.start_sidecar(
                up_port, idle_port, "--max-subscriptions", str(args.subscriptions + 200)
            )
            wait_port(idle_port)
            per_sub = asyncio.run(
                idle_memory(f"http://127.0.0.1:{idle_port}", idle_proc.pid, args.subscriptions)
            )
            merges = {label: merge_ms(label) for label in LABELS.values()}
        finally:
            procs.stop()

    print("figure                                          | measured      | target")
    print("-" * 78)
    rows = [
        *(
            (
                f"enrich GET {LABELS[cid]} cache on, x nginx",
                f"{ratios[(cid, 'enrich', 'cache on')]:.2f}",
                f">= {target:g}",
                ratios[(cid, "enrich", "cache on")] >= target,
            )
            for cid, target in (("c2k", 1.0), ("c64k", 2.0))
        ),
        *(
            (
                f"enrich GET {LABELS[cid]} cache off, x nginx",
                f"{ratios[(cid, 'enrich', 'sidecar')]:.2f}",
                "",
                True,
            )
            for cid in ("c2k", "c64k")
        ),
        *(
            (
                f"{kind} GET {LABELS[cid]} cache off, x before",
                f"{ratios[(cid, kind, 'sidecar/before')]:.2f}",
                ">= 0.97",
                ratios[(cid, kind, "sidecar/before")] >= 0.97,
            )
            for kind in ("plain", "enrich")
            for cid in SIZES
        ),
        ("merge alone, 2 KiB body", f"{merges['2 KiB']:.4f} ms", "", True),
        ("merge alone, 64 KiB body", f"{merges['64 KiB']:.4f} ms", "", True),
        ("merge alone, 1 MiB body", f"{merges['1 MiB']:.3f} ms", "< 0.5 ms", merges["1 MiB"] < 0.5),
        (
            f"ingest with polls running ({poll_rps:.0f} polls/s)",
            f"{events_per_s:,.0f} ev/s",
            ">= 50,000",
            events_per_s >= 50_000,
        ),
        ("event to visible in a GET, p50", f"{p50:.2f} ms", "", True),
        ("event to visible in a GET, p99", f"{p99:.2f} ms", "< 10 ms", p99 < 10),
        *(
            (
                f"hop at 1 connection, 2 KiB {kind}: p50 added",
                f"{hop[kind][0]:+.0f} µs",
                "",
                True,
            )
            for kind in ("plain", "enrich")
        ),
        *(
            (
                f"  p99 direct -> through the sidecar, {kind}",
                f"{hop[kind][1]:.0f} -> {hop[kind][2]:.0f} µs",
                "",
                True,
            )
            for kind in ("plain", "enrich")
        ),
        (
            f"resident memory per idle subscription ({args.subscriptions})",
            f"{per_sub:.1f} KiB",
            "< 20 KiB",
            per_sub < 20,
        ),
    ]
    for name, value, target, ok in rows:
        mark = "" if not target else ("  ok" if ok else "  MISSED")
        print(f"{name:<47} | {value:>13} | {target}{mark}")
    print()
    print("the store (same run, alternately)     | SQLite on  | memory     | on / off")
    print("-" * 78)
    for name, on, off in store_rows:
        print(f"{name:<37} | {on:>10,.0f} | {off:>10,.0f} | {on / off:.2f}")
    if args.json is not None:
        figures = Figures()
        for cid in SIZES:
            for kind in ("plain", "enrich"):
                for name in ("sidecar", "cache on") if kind == "enrich" else ("sidecar",):
                    rps, _, p99 = everything[(cid, kind, name)]
                    label = "cache off" if name == "sidecar" else name
                    figures.higher(f"{kind} GET {LABELS[cid]}, {label}, req/s", rps)
                    figures.lower(f"{kind} GET {LABELS[cid]}, {label}, p99 ms", p99)
        figures.higher("events ingested with polls running, ev/s", events_per_s)
        figures.lower("event to visible in a GET, p99 ms", p99_visible)
        figures.lower("resident memory per idle subscription, KiB", per_sub)
        for name, on, _off in store_rows:
            figures.higher(f"SQLite store on: {name}", on)
        figures.write(args.json)
    return 0


class Figures:
    """What a bench measured, each with the way it is better (for bench/ab.py)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, object]] = {}

    def higher(self, name: str, value: float) -> None:
        self.rows[name] = {"value": value, "better": "higher"}

    def lower(self, name: str, value: float) -> None:
        self.rows[name] = {"value": value, "better": "lower"}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
