"""Cache hits against nginx, alternately in one run: is a hit as fast as nginx?

    python bench/hits.py [--rounds 3] [--duration 5] [--baseline REV] [--profile]

The same upstream as bench/run.py (nginx serving the conversation bodies as
static files, one worker), and in front of it, one process each, all on
127.0.0.1: nginx as a proxy (one worker, keep-alive, buffering on), the
sidecar with ``--cache events``, and, with ``--baseline``, the sidecar of
that git revision with the cache on too. wrk (1 thread, 32 connections)
measures the enrich GET at 2 KiB and 64 KiB; every front is measured once
per round, in turn, and the figures are medians of the rounds, so a busy
machine weighs on all of them alike. Targets: a hit >= 1.0x nginx at 2 KiB,
>= 2x at 64 KiB.

``--profile`` also runs one more sidecar under cProfile for one wrk run on
the 2 KiB hit and prints the functions that took the most time of their own.
"""

from __future__ import annotations

import argparse
import io
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (  # noqa: E402
    LABELS,
    Processes,
    _baseline_source,
    _median,
    free_port,
    start_nginx,
    wait_port,
    wrk,
)
from upstream import SIZES as UPSTREAM_SIZES  # noqa: E402
from upstream import conversation as upstream_body  # noqa: E402

TARGETS = {"c2k": 1.0, "c64k": 2.0}


def warm(base: str) -> None:
    """Open each conversation's stream and keep its answer (two reads)."""
    for cid in TARGETS:
        for _ in range(3):
            subprocess.run(
                ["curl", "-s", "-o", "/dev/null", f"{base}/api/v2/conversations/{cid}"],
                check=False,
            )
            time.sleep(0.3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="git revision of the sidecar to compare against")
    parser.add_argument("--profile", action="store_true", help="profile a 2 KiB hit (cProfile)")
    parser.add_argument(
        "--cache",
        choices=("events", "off"),
        default="events",
        help="off: the same comparison with the cache off (every GET a hop and a merge)",
    )
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if shutil.which("wrk") is None or not Path(nginx).exists():
        print("bench needs wrk and nginx: apt-get update && apt-get install -y wrk nginx")
        return 2
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        static = tmp / "static" / "api/v2/conversations"
        static.mkdir(parents=True)
        for cid, size in UPSTREAM_SIZES.items():
            (static / cid).write_bytes(upstream_body(cid, size))
        for directory in (tmp, *(tmp / "static").rglob("*")):  # nginx's worker reads them
            if directory.is_dir():
                directory.chmod(0o755)
        procs = Processes()
        ev_port, up_port, nx_port = free_port(), free_port(), free_port()
        me = "sidecar hit" if args.cache == "events" else "sidecar"
        was = "before, hit" if args.cache == "events" else "before"
        fronts = {"nginx": nx_port, me: free_port()}
        if args.baseline:
            fronts[was] = free_port()
        try:
            procs.start(sys.executable, str(HERE / "upstream.py"), "--port", str(ev_port))
            wait_port(ev_port)
            start_nginx(procs, nginx, tmp, tmp / "static", ev_port, up_port, nx_port)
            cache = ("--store", "memory", "--cache", args.cache)
            procs.start_sidecar(up_port, fronts[me], *cache)
            if args.baseline:
                source = _baseline_source(tmp, args.baseline)
                procs.start_sidecar(up_port, fronts[was], *cache, source=source)
            for port in (up_port, *fronts.values()):
                wait_port(port)
            for name, port in fronts.items():
                if name != "nginx":
                    warm(f"http://127.0.0.1:{port}")
            runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
            names = list(fronts)
            for round_ in range(args.rounds):
                # Rotated every second round, reversed every other one (ABBA
                # with two fronts): no front always runs after the same one.
                shift = (round_ // 2) % len(names)
                turn = names[shift:] + names[:shift]
                if round_ % 2:
                    turn.reverse()
                for cid in TARGETS:
                    for name in turn:
                        port = fronts[name]
                        url = f"http://127.0.0.1:{port}/api/v2/conversations/{cid}"
                        runs.setdefault((cid, name), []).append(
                            wrk(url, args.duration, args.connections)
                        )
            profile = run_profile(procs, up_port, tmp, args) if args.profile else None
        finally:
            procs.stop()
    print(
        f"wrk: 1 thread, {args.connections} connections, {args.duration:g} s per run, "
        f"medians of {args.rounds} rounds, every front once per round in turn, "
        "rotated and reversed in turn\n"
    )
    head = f"{'body':>7} | {'front':<12} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | x nginx"
    print(head)
    print("-" * len(head))
    verdicts = []
    for cid, target in TARGETS.items():
        nginx_rps = _median(runs[(cid, "nginx")])[0]
        for name in fronts:
            rps, p50, p99 = _median(runs[(cid, name)])
            ratio = rps / nginx_rps
            print(
                f"{LABELS[cid]:>7} | {name:<12} | {rps:>8.0f} | {p50:>7.2f} | {p99:>7.2f} "
                f"| {ratio:.2f}"
            )
            if name == me:
                verdicts.append((LABELS[cid], ratio, target))
            if name == was:
                print(
                    f"{'':>7} | {'':<12} | {'':>8} | {'':>7} | {'':>7} | now / before: "
                    f"{_median(runs[(cid, me)])[0] / rps:.2f}"
                )
    print()
    for label, ratio, target in verdicts if args.cache == "events" else ():
        mark = "ok" if ratio >= target else "MISSED"
        print(f"cache hit {label}, x nginx proxy_pass: {ratio:.2f} (target >= {target:g})  {mark}")
    if profile is not None:
        print("\nthe 2 KiB hit under cProfile (one wrk run), by time of its own:\n")
        print(profile)
    return 0


def run_profile(procs: Processes, up_port: int, tmp: Path, args: argparse.Namespace) -> str:
    """A sidecar under cProfile for one wrk run on the 2 KiB hit: its top rows."""
    port = free_port()
    out = tmp / "hit.prof"
    cmd = (
        sys.executable, "-m", "cProfile", "-o", str(out), "-m", "sidecar",
        "--upstream", f"http://127.0.0.1:{up_port}", "--port", str(port),
        "--log-level", "warning", "--store", "memory", "--cache", "events",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        warm(f"http://127.0.0.1:{port}")
        wrk(f"http://127.0.0.1:{port}/api/v2/conversations/c2k", args.duration, args.connections)
    finally:
        proc.send_signal(2)  # SIGINT: a clean exit, so cProfile writes its file
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = io.StringIO()
    stats = pstats.Stats(str(out), stream=text)
    stats.strip_dirs().sort_stats("tottime").print_stats(18)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:])


if __name__ == "__main__":
    sys.exit(main())
