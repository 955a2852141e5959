"""Assembling the aiohttp application: client sessions, registry, proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .config import Settings
from .profile import Profile, load_profile
from .proxy import Proxy
from .registry import Registry

__all__ = ["PROXY", "REGISTRY", "SETTINGS", "create_app"]

SETTINGS = web.AppKey("settings", Settings)
PROFILE = web.AppKey("profile", Profile)
REGISTRY = web.AppKey("registry", Registry)
PROXY = web.AppKey("proxy", Proxy)

#: Headers aiohttp's client would otherwise add on its own. A proxy forwards
#: the client's headers, and only those.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


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
    requests = _client_session(settings)
    streams = _client_session(settings)
    registry = Registry(profile, settings, streams)
    app[REGISTRY] = registry
    app[PROXY] = Proxy(settings, profile, registry, requests)
    try:
        yield
    finally:
        await registry.close()
        await requests.close()
        await streams.close()


def create_app(settings: Settings, profile: Profile | None = None) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 65536})
    app[SETTINGS] = settings
    app[PROFILE] = profile if profile is not None else load_profile(settings.profile)
    app.cleanup_ctx.append(_lifetime)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].handle(request)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app
