"""Running the sidecar as a process: listening, and shutting down gracefully.

On SIGTERM (or SIGINT): ``/readyz`` turns 503, the listening sockets close,
open SSE passthroughs are ended cleanly (a client's EventSource reconnects,
to another replica if there is one), in-flight requests get up to
``shutdown_grace`` seconds to finish, subscriptions close, and the process
exits 0. The default grace (20 s) fits inside Kubernetes' default 30 s
``terminationGracePeriodSeconds`` with room for a ``preStop`` pause.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .app import HEALTH, PROXY, create_admin_app, create_app
from .config import Settings
from .profile import Profile

__all__ = ["JsonAccessLogger", "run"]

log = logging.getLogger("sidecar")


class JsonAccessLogger(AbstractAccessLogger):
    """One structured line per request: no query string, no headers, no body."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 3),
                "bytes": response.body_length,
                "remote": request.remote,
            },
        )


async def run(settings: Settings, profile: Profile) -> int:
    app = create_app(settings, profile)
    access = logging.getLogger("sidecar.access") if settings.access_log else None
    runner = web.AppRunner(
        app,
        access_log=access,
        access_log_class=JsonAccessLogger,
        shutdown_timeout=settings.shutdown_grace,
        handle_signals=False,
        # A client that leaves cancels its handler at once, which closes the
        # upstream request it was relaying instead of waiting for a write.
        handler_cancellation=True,
    )
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    admin_runner = None
    if settings.admin_port is not None:
        admin_runner = web.AppRunner(create_admin_app(app), access_log=None, handle_signals=False)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, settings.host, settings.admin_port).start()
    log.info(
        "listening",
        extra={
            "host": settings.host,
            "port": settings.port,
            "admin_port": settings.admin_port,
            "upstream": settings.upstream,
            "profile": profile.name,
        },
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down", extra={"grace_s": settings.shutdown_grace})
    app[HEALTH].shutting_down = True
    app[PROXY].begin_shutdown()
    await runner.cleanup()  # stop listening, drain within the grace, close streams
    if admin_runner is not None:
        await admin_runner.cleanup()
    log.info("stopped")
    return 0
