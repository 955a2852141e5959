"""The wiring: the one place that builds the parts and hands each what it needs.

Every other module receives its collaborators and its slice of the settings;
only this one reads :class:`~sidecar.config.Settings` whole and decides:

* which **store** the snapshots outlive the process in (:func:`open_store`:
  memory, an SQLite file, or a fleet's Redis), and, for a fleet, that the
  registry and the shared store talk through their two interfaces
  (``sidecar.state.ports``): ``Registry(fleet=store)``, ``store.start(registry)``;
* the **registry** (``sidecar.state``) and the **proxy** (``sidecar.proxy``),
  each with its own settings slice and its own HTTP client session (proxied
  requests, and the sidecar's own long-lived streams);
* the **webhooks** (``sidecar.webhooks``), when receivers are configured:
  their outbox lives with the store (:func:`open_outbox`: memory, the same
  SQLite file, or the fleet's Redis), and they hear of transitions from the
  registry and, for a fleet, from the shared store's writes;
* the **admin** endpoints and metrics (``sidecar.ops``), reading the parts'
  own counters.

The aiohttp application holds them under ``web.AppKey`` s, and their
lifetime is one ``cleanup_ctx``: made at start, closed in reverse at stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from . import __version__
from .config import Settings
from .core.profile import Profile, load_profile
from .ops.admin import Health, add_admin_routes, probe_upstream
from .ops.metrics import Metrics
from .proxy.counts import Counts
from .proxy.router import Proxy
from .proxy.settings import ProxySettings
from .state.fleet import RedisStore
from .state.registry import Registry, RegistrySettings
from .state.store import MemoryStore, SqliteStore, Store, default_path
from .webhooks.delivery import Deliveries
from .webhooks.outbox import MemoryOutbox, Outbox, SqliteOutbox
from .webhooks.receivers import WebhookSettings
from .webhooks.redis_outbox import RedisOutbox

__all__ = [
    "ADMIN_PREFIX",
    "HEALTH",
    "METRICS",
    "PROXY",
    "REGISTRY",
    "SETTINGS",
    "WEBHOOKS",
    "create_admin_app",
    "create_app",
    "open_outbox",
    "open_store",
]

SETTINGS = web.AppKey("settings", Settings)
PROFILE = web.AppKey("profile", Profile)
REGISTRY = web.AppKey("registry", Registry)
PROXY = web.AppKey("proxy", Proxy)
HEALTH = web.AppKey("health", Health)
METRICS = web.AppKey("metrics", Metrics)
WEBHOOKS = web.AppKey("webhooks", Deliveries)

#: Headers aiohttp's client would otherwise add on its own. A proxy forwards
#: the client's headers, and only those.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
ADMIN_PREFIX = "/_sidecar"

_Slice = TypeVar("_Slice")


def settings_slice(settings: Settings, kind: type[_Slice]) -> _Slice:
    """The options a part reads (its own dataclass), taken from the whole."""
    names: dict[str, Any] = {f.name: getattr(settings, f.name) for f in fields(kind)}  # type: ignore[arg-type]
    return kind(**names)


def open_store(settings: Settings) -> Store:
    """``memory``, ``sqlite:PATH``, ``sqlite`` (the default path for this
    upstream), or ``redis://…`` (shared by a fleet: ``sidecar.state.fleet``)."""
    spec = settings.store
    if spec == "memory":
        return MemoryStore()
    if spec.startswith(("redis://", "rediss://")):
        return RedisStore(
            spec,
            prefix=settings.store_prefix,
            password=settings.store_password,
            timeout=settings.store_timeout,
            lease_ttl=settings.lease_ttl,
            retention=settings.retention,
            upstream=settings.upstream,
            adopt=settings.store_adopt,
            limit=settings.max_event_bytes,
            standby_max=settings.max_snapshots,
        )
    upstream, flush_every, retention = settings.upstream, settings.store_flush, settings.retention
    path = Path(spec.partition(":")[2]) if spec.startswith("sqlite:") else default_path(upstream)
    store = SqliteStore(
        path,
        flush_every,
        retention,
        upstream=upstream,
        adopt=settings.store_adopt,
        limit=settings.max_event_bytes,
    )
    store.open()
    return store


def open_outbox(settings: Settings, store: Store) -> Outbox:
    """Where webhooks wait to be delivered: with the store's snapshots, so they
    outlive a restart (SQLite) or a replica (Redis) as the snapshots do."""
    receivers = [r.name for r in settings.receivers]
    limit = settings.webhook_outbox_max
    if isinstance(store, RedisStore):
        return RedisOutbox(
            store.url,
            prefix=settings.store_prefix,
            password=settings.store_password,
            timeout=settings.store_timeout,
            lease_ttl=settings.lease_ttl,
            replica=store.replica,
            receivers=receivers,
            limit=limit,
        )
    if isinstance(store, SqliteStore):
        outbox = SqliteOutbox(store.path, receivers, limit)
        outbox.open()
        return outbox
    return MemoryOutbox(receivers, limit)


def open_webhooks(settings: Settings, store: Store) -> Deliveries | None:
    if not settings.receivers:
        return None
    webhooks = settings_slice(settings, WebhookSettings)
    return Deliveries(webhooks, open_outbox(settings, store), f"sidecar/{__version__}")


def _client_session(settings: Settings) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        # limit=0: streams hold connections for hours; a pool cap would
        # silently queue every other request behind them.
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout),
        trust_env=False,
    )


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    profile = app[PROFILE]
    metrics = app[METRICS]
    # Two pools: proxied requests, and the sidecar's own long-lived streams.
    store = open_store(settings)
    requests = _client_session(settings)
    streams = _client_session(settings)
    fleet = store if isinstance(store, RedisStore) else None
    webhooks = open_webhooks(settings, store)
    registry = Registry(
        profile,
        settings_slice(settings, RegistrySettings),
        streams,
        store,
        fleet=fleet,
        transitions=webhooks,
    )
    app[REGISTRY] = registry
    if webhooks is not None:
        app[WEBHOOKS] = webhooks
        await webhooks.start()
        metrics.watch_webhooks(webhooks)
        if fleet is not None:
            fleet.transitions = webhooks
    registry.restore()
    if fleet is not None:
        await fleet.start(registry)
    metrics.watch(registry)
    counts = Counts()
    metrics.watch_requests(counts)
    proxy = app[PROXY] = Proxy(
        settings_slice(settings, ProxySettings), profile, registry, requests, counts
    )
    if proxy.cache is not None:
        metrics.watch_cache(proxy.cache)
    probe = probe_upstream(app[HEALTH], settings, profile, requests)
    await anext(probe)
    try:
        yield
    finally:
        await probe.aclose()
        proxy.close()
        await registry.close()
        if fleet is not None:
            await fleet.aclose()
        if webhooks is not None:
            await webhooks.close()  # before the store: the SQLite outbox shares its file
        await asyncio.get_running_loop().run_in_executor(None, store.close)
        await requests.close()
        await streams.close()


def create_app(settings: Settings, profile: Profile | None = None) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 16384})
    app[SETTINGS] = settings
    app[PROFILE] = profile if profile is not None else load_profile(settings.profile)
    app[HEALTH] = Health()
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_lifetime)
    if settings.admin_port is None:
        _add_admin(app, app, probes_at_root=False)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].handle(request)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def create_admin_app(main: web.Application) -> web.Application:
    """The admin endpoints on their own port, reading the main app's state."""
    admin = web.Application()
    _add_admin(admin, main, probes_at_root=True)
    return admin


def _add_admin(target: web.Application, main: web.Application, probes_at_root: bool) -> None:
    add_admin_routes(
        target,
        prefix=ADMIN_PREFIX,
        probes_at_root=probes_at_root,
        settings=main[SETTINGS],
        health=main[HEALTH],
        registry=lambda: main[REGISTRY],
        metrics=main[METRICS],
        webhooks=lambda: main.get(WEBHOOKS),
    )
