"""A histogram as plain counts: observed on the hot path, made a metric at scrape time.

A labelled prometheus-client child takes a lock and a label lookup on every
observation; the parts count here instead, and ``sidecar.ops.metrics``
builds the families when scraped.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["DELIVERY_BUCKETS", "LATENCY_BUCKETS", "Histogram"]

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: From a transition to its webhook's delivery: milliseconds (a receiver up) to
#: an hour (one that was down).
DELIVERY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)


class Histogram:
    """Counts per bucket (each value in the first bucket whose bound is >= it)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out
