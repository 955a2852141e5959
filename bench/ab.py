"""Old code against new, in one run: every figure of make bench, new ÷ old.

    python bench/ab.py --old REVISION [--rounds 2] [--duration 3] [--benches run,fleet,gptme]

The old revision's package is taken from git (``git archive``: ``sidecar/``
and ``config/``) into a temporary directory; it runs on this tree's
interpreter and dependencies (they are the same packages a second venv
would install; a bench installs nothing and reaches no network). Each bench
program then runs once per side per round, the sides alternating (the first
side of a round alternates too), with ``BENCH_SIDECAR_SOURCE`` pointing the
old side's sidecars at the old package; each writes its figures as JSON
(``--json``). Printed: per figure, the median of each side, and new ÷ old
(for figures where lower is better, old ÷ new: above 1 is always better).
A ratio under ``--floor`` (0.97) is marked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import _baseline_source  # noqa: E402

BENCHES = {
    "run": ["--rounds", "1"],
    "fleet": ["--rounds", "1"],
    "gptme": [],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--benches", default=",".join(BENCHES))
    parser.add_argument("--floor", type=float, default=0.97)
    args = parser.parse_args()
    benches = [b for b in args.benches.split(",") if b]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        old = _baseline_source(tmp, args.old)
        seen: dict[str, dict[str, list[float]]] = {"new": {}, "old": {}}
        better: dict[str, str] = {}
        for round_ in range(args.rounds):
            sides = ("new", "old") if round_ % 2 == 0 else ("old", "new")
            for bench in benches:
                for side in sides:
                    out = tmp / f"{bench}-{side}-{round_}.json"
                    env = {k: v for k, v in os.environ.items() if k != "BENCH_SIDECAR_SOURCE"}
                    if side == "old":
                        env["BENCH_SIDECAR_SOURCE"] = str(old)
                    cmd = [sys.executable, str(HERE / f"{bench}.py"), *BENCHES.get(bench, [])]
                    cmd += ["--duration", str(args.duration), "--json", str(out)]
                    print(f"round {round_ + 1}: {bench} ({side})", flush=True)
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if done.returncode != 0 or not out.exists():
                        print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
                        return 1
                    for name, row in json.loads(out.read_text()).items():
                        seen[side].setdefault(name, []).append(float(row["value"]))
                        better[name] = row["better"]
    print(f"\nnew (this tree) against old ({args.old}): medians of {args.rounds} rounds\n")
    head = f"{'figure':<58} | {'new':>10} | {'old':>10} | better x"
    print(head)
    print("-" * len(head))
    worst = float("inf")
    for name in seen["new"]:
        if name not in seen["old"]:
            continue
        new, old_value = statistics.median(seen["new"][name]), statistics.median(seen["old"][name])
        if better[name] == "higher":
            ratio = new / old_value if old_value else float("nan")
        else:
            ratio = old_value / new if new else float("nan")
        worst = min(worst, ratio)
        mark = "" if ratio >= args.floor else "  below the floor"
        print(f"{name:<58} | {new:>10.2f} | {old_value:>10.2f} | {ratio:>8.2f}{mark}")
    print(f"\nworst: {worst:.2f} (floor {args.floor})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
