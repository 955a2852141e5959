"""Prometheus metrics, one registry per application.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms). No label ever carries a resource id: label sets stay bounded
whatever clients and upstreams send. Event types outside the profile are
counted as ``other`` for the same reason.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .cache import ResponseCache
from .registry import Registry

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (
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


class Metrics:
    """The sidecar's metrics.

    The request path counts in plain dicts, and the families are built at
    scrape time: a labelled prometheus-client child takes a lock and a label
    lookup on every call, which cost more than the rest of a merge.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (kind, method, code)
        self.merges: Counter[str] = Counter()  # by result
        self.upstream_latency: dict[str, _Histogram] = {}  # by kind of route
        self.registry.register(_ProxyCollector(self))

    def count_request(self, kind: str, method: str, code: int) -> None:
        self.requests[(kind, method, str(code))] += 1

    def count_merge(self, result: str) -> None:
        self.merges[result] += 1

    def observe_upstream_latency(self, kind: str, seconds: float) -> None:
        histogram = self.upstream_latency.get(kind)
        if histogram is None:
            histogram = self.upstream_latency[kind] = _Histogram(_LATENCY_BUCKETS)
        histogram.observe(seconds)

    def watch(self, registry: Registry) -> None:
        """Read the registry's live figures at every scrape."""
        self.registry.register(_RegistryCollector(registry))

    def watch_cache(self, cache: ResponseCache) -> None:
        """Read the response cache's figures at every scrape."""
        self.registry.register(_CacheCollector(cache))


class _Histogram:
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


class _ProxyCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield _labelled_counter(
            "sidecar_requests_total",
            "Requests answered, by kind of route, method and status code.",
            ("kind", "method", "code"),
            m.requests,
        )
        latency = HistogramMetricFamily(
            "sidecar_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            labels=["kind"],
        )
        for kind, histogram in sorted(m.upstream_latency.items()):
            latency.add_metric([kind], histogram.cumulative(), histogram.total)
        yield latency
        yield _labelled_counter(
            "sidecar_merges_total",
            "Enrich responses, by result: merged, or passed unchanged (and why).",
            ("result",),
            m.merges,
        )


class _CacheCollector(Collector):
    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        yield _labelled_counter(
            "sidecar_cache_requests_total",
            "Enrich GETs with the response cache on, by result and reason: hit (fresh, "
            "collapsed: waited for another request's answer), miss (absent, expired, content: "
            "a content event or a write since, stream: not live throughout, vary), bypass "
            "(not_live, no_cache: the client asked, unauthorised), revalidated (not_modified, "
            "modified: the upstream's answer to the entry's validator).",
            ("result", "reason"),
            cache.counts,
        )
        yield _gauge("sidecar_cache_entries", "Answers held by the response cache.", len(cache))
        yield _gauge(
            "sidecar_cache_bytes",
            "Bytes held by the response cache (bound: cache_max_bytes).",
            cache.bytes,
        )


class _RegistryCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        reg = self._registry
        subs = GaugeMetricFamily(
            "sidecar_subscriptions", "Upstream event streams open, by state.", labels=["stream"]
        )
        by_stream = Counter(sub.stream for sub in reg.subscriptions)
        for state in ("connecting", "live", "reconnecting", "lost"):
            subs.add_metric([state], by_stream.get(state, 0))
        yield subs

        snapshots = GaugeMetricFamily(
            "sidecar_snapshots", "Snapshots kept, by status.", labels=["status"]
        )
        convs = reg.conversations()
        for status, n in sorted(Counter(c.snapshot.status for c in convs).items()):
            snapshots.add_metric([status], n)
        yield snapshots

        now = time.time()
        ages = [now - c.snapshot.updated_at for c in convs if c.snapshot.updated_at]
        yield _gauge(
            "sidecar_snapshot_age_seconds",
            "Age of the oldest snapshot of work in flight (0 when none).",
            max(
                (
                    now - c.snapshot.updated_at
                    for c in convs
                    if c.snapshot.updated_at and c.snapshot.generating
                ),
                default=0.0,
            ),
        )
        yield _gauge(
            "sidecar_snapshot_newest_age_seconds",
            "Time since any snapshot last changed.",
            min(ages, default=0.0),
        )
        yield _gauge(
            "sidecar_store_degraded",
            "1 when the snapshot store cannot be used and snapshots live in memory only.",
            1.0 if reg.store.degraded else 0.0,
        )
        if reg.fleet is not None:
            fleet = reg.fleet
            yield _gauge(
                "sidecar_fleet_leases",
                "Upstream streams this replica holds under a lease (the rest are others').",
                float(len(fleet.leases)),
            )
            yield _labelled_counter(
                "sidecar_fleet_operations_total",
                "Shared-store operations by outcome: writes, conflicts (rewritten on the newer "
                "snapshot), fenced (refused: the lease was another's), takeovers, reads, errors.",
                ("outcome",),
                fleet.counts,
            )
        yield _counter(
            "sidecar_reconnects_total",
            "Times an upstream event stream was opened again after it ended.",
            reg.reconnects,
        )
        yield _labelled_counter(
            "sidecar_events_total",
            "Events received from upstream streams, by type.",
            ("type",),
            reg.events_by_type,
        )
        yield _counter(
            "sidecar_malformed_events_total",
            "Events skipped: not JSON, not an object, no type, or over the size bound.",
            reg.malformed_events + reg.oversized_events,
        )


def _gauge(name: str, doc: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _counter(name: str, doc: str, value: float) -> Metric:
    family = CounterMetricFamily(name.removesuffix("_total"), doc)
    family.add_metric([], value)
    return family


def _labelled_counter(
    name: str, doc: str, labels: tuple[str, ...], counts: Mapping[Any, int]
) -> Metric:
    """A counter family; a key is one label's value, or a tuple of all of them."""
    family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))
    for key, n in sorted(counts.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return family
