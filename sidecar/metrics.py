"""Prometheus metrics, one registry per application.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms). No label ever carries a resource id: label sets stay bounded
whatever clients and upstreams send. Event types outside the profile are
counted as ``other`` for the same reason.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .registry import Registry

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = PromCounter(
            "sidecar_requests",
            "Requests answered, by kind of route, method and status code.",
            ["kind", "method", "code"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "sidecar_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.merges = PromCounter(
            "sidecar_merges",
            "Enrich responses, by result: merged, or passed unchanged (and why).",
            ["result"],
            registry=self.registry,
        )

    def watch(self, registry: Registry) -> None:
        """Read the registry's live figures at every scrape."""
        self.registry.register(_RegistryCollector(registry))


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
        yield _counter(
            "sidecar_reconnects_total",
            "Times an upstream event stream was opened again after it ended.",
            reg.reconnects,
        )
        yield _labelled_counter(
            "sidecar_events_total",
            "Events received from upstream streams, by type.",
            "type",
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


def _labelled_counter(name: str, doc: str, label: str, counts: Counter[str]) -> Metric:
    family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=[label])
    for key, n in sorted(counts.items()):
        family.add_metric([key], n)
    return family
