"""Prometheus metrics, one registry per application.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms). No label ever carries a resource id: label sets stay bounded
whatever clients and upstreams send. Event types outside the profile are
counted as ``other`` for the same reason.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..state.registry import Registry

__all__ = ["CacheFigures", "Metrics", "RequestCounts", "WebhookFigures"]


class Cumulative(Protocol):
    @property
    def total(self) -> float: ...
    def cumulative(self) -> list[tuple[str, float]]: ...


class RequestCounts(Protocol):
    """What the request path counts (``sidecar.proxy.counts``)."""

    @property
    def requests(self) -> Mapping[tuple[str, str, str], int]: ...
    @property
    def merges(self) -> Mapping[str, int]: ...
    @property
    def lists(self) -> Mapping[str, int]: ...
    @property
    def list_items(self) -> int: ...
    @property
    def upstream_latency(self) -> Mapping[str, Cumulative]: ...


class CacheFigures(Protocol):
    """What the response cache counts (``sidecar.proxy.cache``)."""

    @property
    def counts(self) -> Mapping[tuple[str, str], int]: ...
    @property
    def bytes(self) -> int: ...
    def __len__(self) -> int: ...


class _CourierFigures(Protocol):
    @property
    def results(self) -> Mapping[str, int]: ...
    @property
    def attempts(self) -> Mapping[str, int]: ...
    @property
    def latency(self) -> Cumulative: ...


class _OutboxFigures(Protocol):
    @property
    def degraded(self) -> str | None: ...
    @property
    def dropped(self) -> Mapping[tuple[str, str], int]: ...
    def count(self, receiver: str) -> int: ...
    def delivers(self, receiver: str) -> bool: ...
    def oldest(self, receiver: str) -> float | None: ...


class WebhookFigures(Protocol):
    """What the webhooks count (``sidecar.webhooks.delivery``)."""

    @property
    def couriers(self) -> Mapping[str, _CourierFigures]: ...
    @property
    def outbox(self) -> _OutboxFigures: ...


#: Every result a webhook can end with, shown for every receiver (zeros too).
WEBHOOK_RESULTS = ("delivered", "expired", "refused", "invalid")
WEBHOOK_OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "timeout", "error")


class Metrics:
    """The sidecar's metrics, read from the parts' own counters at scrape time.

    The request path counts in plain dicts (``sidecar.proxy.counts``) and the
    families are built when scraped: a labelled prometheus-client child takes
    a lock and a label lookup on every call, which cost more than the rest of
    a merge.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def watch_requests(self, counts: RequestCounts) -> None:
        """Read the request path's counts at every scrape."""
        self.registry.register(_ProxyCollector(counts))

    def watch(self, registry: Registry) -> None:
        """Read the registry's live figures at every scrape."""
        self.registry.register(_RegistryCollector(registry))

    def watch_cache(self, cache: CacheFigures) -> None:
        """Read the response cache's figures at every scrape."""
        self.registry.register(_CacheCollector(cache))

    def watch_webhooks(self, webhooks: WebhookFigures) -> None:
        """Read the webhooks' figures at every scrape."""
        self.registry.register(_WebhookCollector(webhooks))


class _WebhookCollector(Collector):
    def __init__(self, webhooks: WebhookFigures) -> None:
        self._webhooks = webhooks

    def collect(self) -> Iterator[Metric]:
        couriers, outbox = self._webhooks.couriers, self._webhooks.outbox
        results: dict[tuple[str, str], int] = {}
        attempts: dict[tuple[str, str], int] = {}
        pending = GaugeMetricFamily(
            "sidecar_webhook_pending",
            "Webhooks waiting for their receiver (a fleet: as this replica last read them).",
            labels=["receiver"],
        )
        oldest = GaugeMetricFamily(
            "sidecar_webhook_oldest_pending_seconds",
            "Age of the oldest webhook waiting for its receiver (0 when none).",
            labels=["receiver"],
        )
        delivering = GaugeMetricFamily(
            "sidecar_webhook_delivering",
            "1 where this process delivers the receiver's webhooks (a fleet: one replica).",
            labels=["receiver"],
        )
        latency = HistogramMetricFamily(
            "sidecar_webhook_delivery_seconds",
            "From a transition to its webhook's delivery (2xx), per receiver.",
            labels=["receiver"],
        )
        now = time.time()
        for name, courier in sorted(couriers.items()):
            for result in WEBHOOK_RESULTS:
                results[(name, result)] = courier.results.get(result, 0) + outbox.dropped.get(
                    (name, result), 0
                )
            for outcome in WEBHOOK_OUTCOMES:
                attempts[(name, outcome)] = courier.attempts.get(outcome, 0)
            pending.add_metric([name], outbox.count(name))
            since = outbox.oldest(name)
            oldest.add_metric([name], now - since if since is not None else 0.0)
            delivering.add_metric([name], 1.0 if outbox.delivers(name) else 0.0)
            latency.add_metric([name], courier.latency.cumulative(), courier.latency.total)
        yield _labelled_counter(
            "sidecar_webhook_deliveries_total",
            "Webhooks by how they ended, per receiver: delivered, expired (not delivered "
            "within webhook_max_age), refused (the outbox was full), invalid (unreadable when "
            "read back from the store).",
            ("receiver", "result"),
            results,
        )
        yield _labelled_counter(
            "sidecar_webhook_attempts_total",
            "Delivery attempts by outcome, per receiver: the answer's class (2xx delivers), "
            "timeout (webhook_timeout), error (no connection, or a broken one).",
            ("receiver", "outcome"),
            attempts,
        )
        yield pending
        yield oldest
        yield delivering
        yield latency
        yield _gauge(
            "sidecar_webhook_outbox_degraded",
            "1 when the webhook outbox cannot keep webhooks beyond this process.",
            1.0 if outbox.degraded else 0.0,
        )


class _ProxyCollector(Collector):
    def __init__(self, counts: RequestCounts) -> None:
        self._metrics = counts

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
        yield _labelled_counter(
            "sidecar_list_merges_total",
            "List answers, by result: merged (its observed items got their snapshots), none "
            "(nothing listed was observed: the upstream's bytes), or passed unchanged (and why: "
            "not_2xx, not_json, not_a_list, too_large...).",
            ("result",),
            m.lists,
        )
        yield _counter(
            "sidecar_list_items_enriched_total",
            "Items of list answers that got their snapshot (the Sidecar-Enriched header's sum).",
            m.list_items,
        )


class _CacheCollector(Collector):
    def __init__(self, cache: CacheFigures) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        yield _labelled_counter(
            "sidecar_cache_requests_total",
            "Enrich GETs with the response cache on, by result and reason: hit (fresh, stale: "
            "served while revalidated in the background, collapsed: waited for another "
            "request's answer), miss (absent, expired, content: "
            "a content event or a write since, stream: not live throughout, vary), bypass "
            "(not_live, no_cache: the client asked, unauthorised), revalidated (not_modified, "
            "modified: the upstream's answer to the entry's validator), background (the "
            "sidecar's own revalidations: not_modified, refreshed, not_stored, failed, "
            "superseded: overtaken by an event while it waited its turn).",
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
        yield _labelled_counter(
            "sidecar_store_rejected_total",
            "Records read back from the store (rows, hashes, channel messages, leases) that "
            "failed their checks and were dropped, by reason.",
            ("reason",),
            reg.store.rejections.counts,
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
