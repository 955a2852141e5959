"""The sidecar's own endpoints: probes, metrics, the state API and a status page.

They never share a path with the upstream. On the main port they live under
``/_sidecar/``; with ``admin_port`` set they move to that port (where the
probes are also at ``/healthz``, ``/readyz`` and ``/metrics``) and the main
port proxies every path.

Closed by default: the probes are always open (kubelets call them without
credentials), but metrics, the state API and the page hold every
conversation's ids and errors, so they are served only with an
``admin_token``, or on an admin port bound to loopback. The token is sent as
``Authorization: Bearer <token>`` (Prometheus, curl) or as the password of
HTTP Basic (a browser's own prompt, so the page never puts it in a URL).
They also answer only to a ``Host`` that is an IP address, ``localhost`` or
one of ``admin_hosts``: a page on another site whose name was rebound to
this address (DNS rebinding) gets a 421.

* ``/healthz``: the process is alive and its event loop turns. Never depends
  on the upstream, so a dead upstream never gets the sidecar restarted.
* ``/readyz``: 200 while the upstream answers the profile's health path and
  the sidecar is not shutting down; 503 otherwise, with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from ..config import Settings
from ..core.profile import Profile
from ..core.snapshot import iso_time
from ..state.registry import Registry
from .metrics import Metrics

__all__ = ["Health", "add_admin_routes", "host_allowed", "probe_upstream", "serves_state"]

log = logging.getLogger("sidecar.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebhookState(Protocol):
    """What the state API shows of the webhooks (``sidecar.webhooks.delivery``)."""

    def state(self) -> dict[str, Any]: ...


@dataclass
class Health:
    shutting_down: bool = False
    #: None until the first probe has answered.
    upstream_reachable: bool | None = None
    last_probe_at: float | None = None
    last_probe_error: str | None = None

    @property
    def ready(self) -> bool:
        return not self.shutting_down and self.upstream_reachable is True

    def reason(self) -> str:
        if self.shutting_down:
            return "shutting down"
        if self.upstream_reachable is None:
            return "the upstream has not been probed yet"
        if not self.upstream_reachable:
            return f"upstream unreachable: {self.last_probe_error}"
        return "ready"


async def probe_upstream(
    health: Health, settings: Settings, profile: Profile, session: aiohttp.ClientSession
) -> AsyncGenerator[None, None]:
    """A cleanup-context body: probe the upstream until the app stops."""
    url = settings.upstream + profile.health_path
    timeout = aiohttp.ClientTimeout(total=settings.connect_timeout * 2)

    async def probe_once() -> None:
        try:
            async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
                await resp.read()
            reachable, error = True, None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reachable, error = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        if reachable != health.upstream_reachable:
            log.info(
                "upstream reachability changed", extra={"reachable": reachable, "error": error}
            )
        health.upstream_reachable, health.last_probe_error = reachable, error
        health.last_probe_at = time.time()

    async def loop() -> None:
        while True:
            await probe_once()
            await asyncio.sleep(settings.probe_interval)

    task = asyncio.get_running_loop().create_task(loop(), name="sidecar-upstream-probe")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def serves_state(settings: Settings, on_admin_port: bool) -> bool:
    """Whether metrics, the state API and the page are served (see the module doc)."""
    if settings.admin_token:
        return True
    return on_admin_port and _is_loopback(settings.admin_host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, settings: Settings) -> bool:
    """The Host names the admin endpoints answer to: IP addresses (which no
    DNS rebinding can produce), localhost, and ``admin_hosts``."""
    if not host_header:
        return False
    try:
        name = URL.build(authority=host_header).host
    except ValueError:
        return False
    if not name:
        return False
    name = name.lower().rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return True
    return name in settings.admin_hosts.split(",")


def _token_matches(given: str, token: str) -> bool:
    """``Bearer <token>``, or HTTP Basic with the token as the password."""
    scheme, _, value = given.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_INDENT_2),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def add_admin_routes(
    app: web.Application,
    *,
    prefix: str,
    probes_at_root: bool,
    settings: Settings,
    health: Health,
    registry: Callable[[], Registry],
    metrics: Metrics,
    webhooks: Callable[[], WebhookState | None] = lambda: None,
) -> None:
    """Register the admin routes on ``app`` (the main app or the admin app)."""

    def protected(handler: Handler) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            if not host_allowed(request.headers.get("Host"), settings):
                return _json(
                    {
                        "error": "this Host is not one the admin endpoints answer to "
                        "(see admin_hosts)",
                        "source": "sidecar",
                    },
                    421,
                )
            token = settings.admin_token
            if token and not _token_matches(request.headers.get("Authorization", ""), token):
                response = _json({"error": "admin token required", "source": "sidecar"}, 401)
                response.headers.add("WWW-Authenticate", 'Bearer realm="sidecar"')
                response.headers.add("WWW-Authenticate", 'Basic realm="sidecar", charset="UTF-8"')
                return response
            return await handler(request)

        return check

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        subs = registry().subscriptions
        body = {
            "ready": health.ready,
            "reason": health.reason(),
            "upstream": {
                "url": settings.upstream,
                "reachable": health.upstream_reachable,
                "last_probe_at": iso_time(health.last_probe_at),
                "error": health.last_probe_error,
            },
            "store": _store_state(registry().store),
            "subscriptions": {
                state: sum(1 for s in subs if s.stream == state)
                for state in ("connecting", "live", "reconnecting", "lost")
            },
        }
        return _json(body, 200 if health.ready else 503)

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def conversations(request: web.Request) -> web.Response:
        items = []
        for conv in reversed(registry().conversations()):  # most recently used first
            snap = conv.snapshot.as_dict()
            items.append(
                {
                    "id": conv.id,
                    "status": snap["status"],
                    "generating": snap["generating"],
                    "last_error": snap["last_error"],
                    "stream": snap["stream"],
                    "updated_at": snap["updated_at"],
                }
            )
        return _json({"conversations": items})

    async def conversation(request: web.Request) -> web.Response:
        resource_id = request.match_info["id"]
        conv = registry().get(resource_id)
        if conv is None:
            return _json({"error": f"no snapshot for {resource_id!r}", "source": "sidecar"}, 404)
        sub = conv.subscription
        return _json(
            {
                "id": conv.id,
                "snapshot": conv.snapshot.as_dict(),
                "subscription": None
                if sub is None
                else {
                    "stream": sub.stream,
                    "connects": sub.connects,
                    "events": sub.events,
                    "last_failure": sub.last_failure,
                    "last_event_id": sub.decoder.last_event_id or None,
                },
                "transitions": list(conv.transitions),
            }
        )

    async def webhook_state(request: web.Request) -> web.Response:
        deliveries = webhooks()
        if deliveries is None:
            return _json({"outbox": None, "receivers": []})
        return _json(deliveries.state())

    async def closed(request: web.Request) -> web.Response:
        return _json(
            {
                "error": "not served without admin_token (or an admin port on loopback): "
                "it would show every conversation's state to anyone",
                "source": "sidecar",
            },
            404,
        )

    async def page(request: web.Request) -> web.Response:
        html = resources.files("sidecar.ops").joinpath("status.html").read_bytes()
        return web.Response(
            body=html, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    routes = [
        web.get(f"{prefix}/healthz", healthz),
        web.get(f"{prefix}/readyz", readyz),
    ]
    if probes_at_root:
        routes += [web.get("/healthz", healthz), web.get("/readyz", readyz)]
    if serves_state(settings, on_admin_port=probes_at_root):
        routes += [
            web.get(f"{prefix}/metrics", protected(metrics_view)),
            web.get(f"{prefix}/", protected(page)),
            web.get(f"{prefix}/conversations", protected(conversations)),
            web.get(f"{prefix}/conversations/{{id}}", protected(conversation)),
            web.get(f"{prefix}/webhooks", protected(webhook_state)),
        ]
        if probes_at_root:
            routes.append(web.get("/metrics", protected(metrics_view)))
    else:
        routes.append(web.route("*", f"{prefix}/{{tail:.*}}", closed))
    app.router.add_routes(routes)


def _store_state(store: Any) -> dict[str, Any]:
    """The store's kind and health; a fleet's replica also says its name and leases."""
    state: dict[str, Any] = {"kind": store.kind, "degraded": store.degraded}
    if getattr(store, "shared", False):
        state["replica"] = store.replica
        state["leases"] = len(store.leases)
    return state
