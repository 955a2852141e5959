"""The shared store's cost: one sidecar process versus two workers with Redis.

    make bench            # or: python bench/fleet.py [--duration 5] [--rounds 2]

The upstream is not the ceiling: nginx (one worker) serves the conversation
bodies as static files and passes only the event streams to bench/upstream.py.
A real ``redis-server`` runs on a free port. Measured alternately, in rounds,
with wrk (1 thread, 32 connections) on the enrich GET of a 2 KiB body:

* one process, ``--store memory`` (the baseline),
* one process, ``--store redis://`` (every GET also reads the shared snapshot),
* ``--workers 2`` with ``--store redis://`` (two processes on one port),

then, at one connection (nothing queues), the latency a GET gains from the
shared store: p50 and p99 with Redis versus memory; and last, a poller that
hops replicas: three replicas, conditional GETs round-robin with the tag the
first answer carried, nothing changing: the share answered ``304``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import NGINX_HEAD, Figures, Processes, free_port, wait_port, wrk  # noqa: E402
from upstream import SIZES, conversation  # noqa: E402

NGINX_CONF = (
    NGINX_HEAD
    + """    upstream events {{ server 127.0.0.1:{events}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/api/v2/conversations/[^/]+/events$ {{
            proxy_pass http://events;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
        location /api/v2/conversations/ {{
            root {tmp}/static;
            default_type application/json;
        }}
    }}
}}
"""
)


def hop_ratio(ports: list[int], path: str, requests: int = 600) -> tuple[int, int]:
    """Conditional GETs spread round-robin over replicas: (304s, all)."""
    import http.client

    def get(port: int, tag: str | None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"If-None-Match": tag} if tag else {})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, resp.getheader("ETag") or ""

    for port in ports:  # every replica has read it (its stream open, or followed)
        get(port, None)
    time.sleep(1.0)
    _, tag = get(ports[0], None)
    hits = sum(get(ports[i % len(ports)], tag)[0] == 304 for i in range(requests))
    return hits, requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here (bench/ab.py)")
    args = parser.parse_args()
    tools = {t: shutil.which(t) or f"/usr/sbin/{t}" for t in ("wrk", "nginx", "redis-server")}
    missing = [t for t, path in tools.items() if not Path(path).exists()]
    if missing:
        print(f"bench/fleet.py needs {', '.join(missing)}: apt-get install -y {' '.join(missing)}")
        return 2
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        static = tmp / "static" / "api" / "v2" / "conversations"
        static.mkdir(parents=True)
        for cid, size in SIZES.items():
            (static / cid).write_bytes(conversation(cid, size))
        for directory in (tmp, *static.parents):  # nginx's worker (nobody) reads them
            if directory.is_relative_to(tmp):
                directory.chmod(0o755)
        static.chmod(0o755)
        procs = Processes()
        ev_port, up_port, redis_port = free_port(), free_port(), free_port()
        ports = {"memory": free_port(), "redis": free_port(), "redis, 2 workers": free_port()}
        try:
            procs.start(sys.executable, str(HERE / "upstream.py"), "--port", str(ev_port))
            (tmp / "nginx.conf").write_text(
                NGINX_CONF.format(tmp=tmp, port=up_port, events=ev_port)
            )
            procs.start(tools["nginx"], "-p", str(tmp), "-c", str(tmp / "nginx.conf"))
            procs.start(
                tools["redis-server"], "--port", str(redis_port), "--bind", "127.0.0.1",
                "--dir", str(tmp), "--save", "", "--appendonly", "no",
            )  # fmt: skip
            for port in (ev_port, up_port, redis_port):
                wait_port(port)
            store = f"redis://127.0.0.1:{redis_port}/0"
            procs.start_sidecar(up_port, ports["memory"], "--store", "memory")
            procs.start_sidecar(up_port, ports["redis"], "--store", store)
            procs.start_sidecar(
                up_port, ports["redis, 2 workers"], "--store", store, "--workers", "2",
                "--store-prefix", "w2:",
            )  # fmt: skip
            for port in ports.values():
                wait_port(port)
            path = "/api/v2/conversations/c2k"
            for port in ports.values():  # streams open (and leases taken) before measuring
                for _ in range(4):
                    subprocess.run(
                        ["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"],
                        check=False,
                    )
            time.sleep(1.0)
            direct = wrk(f"http://127.0.0.1:{up_port}{path}", args.duration, args.connections)
            runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ports}
            for _ in range(args.rounds):
                for name, port in ports.items():
                    url = f"http://127.0.0.1:{port}{path}"
                    runs[name].append(wrk(url, args.duration, args.connections))
            single = {
                name: wrk(f"http://127.0.0.1:{ports[name]}{path}", args.duration, 1)
                for name in ("memory", "redis")
            }
            hops = [free_port() for _ in range(3)]
            for port in hops:
                procs.start_sidecar(up_port, port, "--store", store, "--store-prefix", "hop:")
            for port in hops:
                wait_port(port)
            hits, asked = hop_ratio(hops, path)
        finally:
            procs.stop()

    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    print(
        f"wrk: 1 thread, {args.connections} connections, {args.duration:g} s per run, "
        f"{args.rounds} rounds alternately (median shown); enrich GET, 2 KiB body\n"
    )
    print(f"{'path':<34} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | x one process, memory")
    print("-" * 86)
    print(f"{'upstream (nginx static), direct':<34} | {direct[0]:>8.0f} | {direct[1]:>7.2f} "
          f"| {direct[2]:>7.2f} |")  # fmt: skip
    base = statistics.median(r[0] for r in runs["memory"])
    for name, results in runs.items():
        rps = statistics.median(r[0] for r in results)
        p50 = statistics.median(r[1] for r in results)
        p99 = statistics.median(r[2] for r in results)
        label = f"sidecar, {name}" if "workers" in name else f"sidecar, 1 process, {name}"
        print(f"{label:<34} | {rps:>8.0f} | {p50:>7.2f} | {p99:>7.2f} | {rps / base:.2f}")
    print()
    m50, m99 = single["memory"][1:]
    r50, r99 = single["redis"][1:]
    print("the shared store on a GET, 1 connection | memory    | redis     | added")
    print("-" * 74)
    for name, m, r in (("p50", m50, r50), ("p99", m99, r99)):
        added = (r - m) * 1000
        print(f"{name:<39} | {m * 1000:>6.0f} µs | {r * 1000:>6.0f} µs | {added:+.0f} µs")
    print(
        f"\na poller hopping 3 replicas (round-robin, nothing changing): {hits} of {asked} "
        f"conditional GETs answered 304 ({100 * hits / asked:.1f} %)"
    )
    print(
        "\nOn 2 cores, wrk, nginx, Redis and the sidecars share the CPUs: two workers cannot"
        "\nshow a second core's gain here, only what the shared store costs. Run it on more"
        "\ncores (wrk -t on its own) to see workers scale."
        if (os.cpu_count() or 1) <= 2
        else ""
    )
    if args.json is not None:
        figures = Figures()
        for name, results in runs.items():
            figures.higher(
                f"enrich GET 2 KiB, {name}, req/s", statistics.median(r[0] for r in results)
            )
            figures.lower(
                f"enrich GET 2 KiB, {name}, p99 ms", statistics.median(r[2] for r in results)
            )
        figures.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
