"""Assembling the aiohttp applications: the proxy app and the optional admin app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .admin import Health, add_admin_routes, probe_upstream
from .config import Settings
from .metrics import Metrics
from .profile import Profile, load_profile
from .proxy import Proxy
from .registry import Registry
from .store import open_store

__all__ = ["HEALTH", "METRICS", "PROXY", "REGISTRY", "SETTINGS", "create_admin_app", "create_app"]

SETTINGS = web.AppKey("settings", Settings)
PROFILE = web.AppKey("profile", Profile)
REGISTRY = web.AppKey("registry", Registry)
PROXY = web.AppKey("proxy", Proxy)
HEALTH = web.AppKey("health", Health)
METRICS = web.AppKey("metrics", Metrics)

#: Headers aiohttp's client would otherwise add on its own. A proxy forwards
#: the client's headers, and only those.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
ADMIN_PREFIX = "/_sidecar"


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
    # Two pools: proxied requests, and the sidecar's own long-lived streams.
    store = open_store(settings)
    requests = _client_session(settings)
    streams = _client_session(settings)
    registry = Registry(profile, settings, streams, store)
    app[REGISTRY] = registry
    registry.restore()
    if registry.fleet is not None:
        await registry.fleet.start(registry)
    app[METRICS].watch(registry)
    proxy = app[PROXY] = Proxy(settings, profile, registry, requests, app[METRICS])
    if proxy.cache is not None:
        app[METRICS].watch_cache(proxy.cache)
    probe = probe_upstream(app[HEALTH], settings, profile, requests)
    await anext(probe)
    try:
        yield
    finally:
        await probe.aclose()
        app[PROXY].close()
        await registry.close()
        if registry.fleet is not None:
            await registry.fleet.aclose()
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
    )
