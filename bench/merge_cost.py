"""Merge cost per body size, against a full JSON round trip measured in the same run.

    python bench/merge_cost.py

Prints, for gptme-shaped conversation bodies of 2 KiB, 64 KiB and 1 MiB: the
time to merge a snapshot when the upstream has no ``session`` key (byte-level
insert, gptme 0.31.0; and for a body whose text has escapes, which is also
searched for the key spelt with them), when it has one (full parse, gptme 0.35.1), and the
baseline of ``orjson.loads`` + ``orjson.dumps`` of the same body.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.core.merge import merge
from sidecar.core.snapshot import Snapshot

SIZES = {"2 KiB": 2 * 1024, "64 KiB": 64 * 1024, "1 MiB": 1024 * 1024}
SNAP = Snapshot(status="failed", last_error="Error code: 401", stream="live", updated_at=1.0)


def conversation(size: int, with_session: bool, escapes: bool = False) -> bytes:
    message = {
        "role": "assistant",
        # With escapes: lines, as real answers have ("\n" in the JSON text).
        "content": ("lorem ipsum dolor sit amet\n" if escapes else "lorem ipsum dolor sit amet ")
        * 8,
        "timestamp": "2026-11-24T01:00:00",
    }
    log: list[dict[str, str]] = []
    doc: dict[str, object] = {
        "id": "bench",
        "name": "bench",
        "log": log,
        "logfile": "/data/x.jsonl",
    }
    if with_session:
        doc["session"] = {"id": "s1", "generating": False, "last_error": None}
    while len(orjson.dumps(doc)) < size:
        log.append(message)
    return orjson.dumps(doc)


def per_call(fn: Callable[[], object], budget: float = 0.3) -> float:
    """Seconds per call: the best of 5 rounds sized to fill ``budget``."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget / 5:
        fn()
        n += 1
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main() -> None:
    columns = (
        "insert (0.31.0)",
        "insert, escapes",
        "full parse (0.35.1)",
        "loads+dumps",
        "insert / baseline",
        "key search: rfind",
        "key search: in",
    )
    print(f"{'body':>7} | " + " | ".join(f"{c:>20}" for c in columns))
    print("-" * 171)
    needle = b'"session"'
    for label, size in SIZES.items():
        plain, with_session = conversation(size, False), conversation(size, True)
        insert = per_call(lambda b=plain: merge(b, "session", SNAP))
        # A body with escapes is also searched for the key spelt with them.
        lines = conversation(size, False, escapes=True)
        escaped = per_call(lambda b=lines: merge(b, "session", SNAP))
        full = per_call(lambda b=with_session: merge(b, "session", SNAP))
        base = per_call(lambda b=plain: orjson.dumps(orjson.loads(b)))
        # The insert's one scan of the body: is the key absent? Both answer
        # the same; the reverse search is the faster in CPython on JSON text.
        rfind = per_call(lambda b=plain: b.rfind(needle))
        forward = per_call(lambda b=plain: needle in b)
        cells = [f"{t * 1e6:>17.1f} µs" for t in (insert, escaped, full, base)]
        searches = [f"{t * 1e6:>17.1f} µs" for t in (rfind, forward)]
        print(f"{label:>7} | " + " | ".join([*cells, f"{insert / base:>20.3f}", *searches]))


if __name__ == "__main__":
    main()
