"""What the request path counts: plain dicts, turned into metrics at scrape time.

A labelled prometheus-client child takes a lock and a label lookup on every
call, which cost more than the rest of a merge; so the request path adds to
these, and ``sidecar.ops.metrics`` builds the families when scraped. No key
ever carries a resource id: label sets stay bounded.
"""

from __future__ import annotations

from collections import Counter

from ..core.histogram import LATENCY_BUCKETS, Histogram

__all__ = ["LATENCY_BUCKETS", "Counts", "Histogram"]


class Counts:
    """Requests answered, merges (of a GET, of a list) by result, upstream
    latency by kind of route."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (kind, method, code)
        self.merges: Counter[str] = Counter()  # by result
        self.lists: Counter[str] = Counter()  # list answers, by result
        self.list_items = 0  # items of list answers that got their snapshot
        self.upstream_latency: dict[str, Histogram] = {}  # by kind of route

    def count_request(self, kind: str, method: str, code: int) -> None:
        self.requests[(kind, method, str(code))] += 1

    def count_merge(self, result: str) -> None:
        self.merges[result] += 1

    def count_list(self, result: str, enriched: int = 0) -> None:
        self.lists[result] += 1
        self.list_items += enriched

    def observe_upstream_latency(self, kind: str, seconds: float) -> None:
        histogram = self.upstream_latency.get(kind)
        if histogram is None:
            histogram = self.upstream_latency[kind] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)
