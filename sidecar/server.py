"""Running the sidecar as a process: listening, and shutting down gracefully.

The main port is the front door's (:mod:`sidecar.front`), with aiohttp's
server behind it for what the front door hands over; the admin port, if set,
is aiohttp's alone.

On SIGTERM (or SIGINT): ``/readyz`` turns 503, the listening sockets close,
open SSE passthroughs are ended cleanly (a client's EventSource reconnects,
to another replica if there is one), held long-polls are answered, idle
keep-alive connections close, in-flight requests get up to
``shutdown_grace`` seconds to finish, subscriptions close, and the process
exits 0. The default grace (20 s) fits inside Kubernetes' default 30 s
``terminationGracePeriodSeconds`` with room for a ``preStop`` pause.

The whole shutdown is bounded by ``shutdown_grace``: requests in flight get
the grace less a reserve for closing (a quarter of it, at most 2 s), every
closing step is bounded, and a watchdog thread (it does not need the event
loop, so it fires even if the loop is stuck) ends the process with exit
code 1 and one log line when the grace is over. A second SIGTERM or SIGINT
ends the process at once (exit code 128 + the signal), as uvicorn and
gunicorn do. A start that fails (a port in use) closes what was opened, the
store first, within the same bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from urllib.parse import unquote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .app import ADMIN_PREFIX, HEALTH, PROXY, create_admin_app, create_app
from .config import Settings
from .core.profile import Profile
from .http.front import Front, log_access
from .proxy.router import Proxy

__all__ = ["JsonAccessLogger", "Server", "run"]

log = logging.getLogger("sidecar")


class JsonAccessLogger(AbstractAccessLogger):
    """The access log of requests aiohttp serves: the same line as the front door's."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        log_access(
            self.logger,
            request.method,
            request.path,
            response.status,
            time,
            response.body_length,
            request.remote,
        )


class Server:
    """A sidecar listening: the front door on the main port, with aiohttp's
    server behind it, and the admin endpoints on their own port if set."""

    def __init__(self, settings: Settings, profile: Profile | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, profile)
        self._access = logging.getLogger("sidecar.access") if settings.access_log else None
        self.runner = web.AppRunner(
            self.app,
            access_log=self._access,
            access_log_class=JsonAccessLogger,
            shutdown_timeout=settings.shutdown_grace,
            handle_signals=False,
            keepalive_timeout=settings.keepalive_timeout,
            # A client that leaves cancels its handler at once, which closes the
            # upstream request it was relaying instead of waiting for a write.
            handler_cancellation=True,
        )
        self.front: Front | None = None
        self.admin_runner: web.AppRunner | None = None
        self.port = 0
        self.admin_port: int | None = None
        self._stopped = False

    async def start(self) -> None:
        settings = self.settings
        await self.runner.setup()
        handlers = self.runner.server
        assert handlers is not None
        proxy = self.app[PROXY]
        local = ADMIN_PREFIX if settings.admin_port is None else None

        def aiohttp_path(path: str) -> bool:
            """The admin paths (aiohttp's own routes, which it matches decoded:
            ``/%5Fsidecar/`` is ``/_sidecar/`` to it), and what the proxy leaves to it."""
            if local is not None:
                plain = unquote(path) if "%" in path else path
                if plain == local or plain.startswith(local + "/"):
                    return True
            return proxy.aiohttp_path(path)

        self.front = Front(
            proxy.handle_get,
            handlers,
            self._access,
            aiohttp_path=aiohttp_path,
            keepalive_timeout=settings.keepalive_timeout,
            header_timeout=settings.header_timeout,
            max_connections=settings.max_connections,
            serve_gets=settings.front_door,
            answer_now=proxy.answer_now,
        )
        shared = settings.workers > 1
        listening = await self.front.listen(settings.host, settings.port, reuse_port=shared)
        self.port = listening.sockets[0].getsockname()[1]
        if settings.admin_port is not None:
            self.admin_runner = web.AppRunner(
                create_admin_app(self.app), access_log=None, handle_signals=False
            )
            await self.admin_runner.setup()
            site = web.TCPSite(
                self.admin_runner,
                settings.admin_host,
                settings.admin_port,
                reuse_port=shared or None,
            )
            await site.start()
            self.admin_port = self.admin_runner.addresses[0][1]

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening, let requests in flight finish (up to ``grace``), clean up."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace if grace is None else grace
        self.app[HEALTH].shutting_down = True
        self.app[PROXY].begin_shutdown()
        handlers = self.runner.server
        if self.front is not None and handlers is not None:
            self.front.close()
            handlers.pre_shutdown()  # aiohttp's idle connections close now
            await asyncio.gather(self.front.drain(grace), handlers.shutdown(grace))
        await self.runner.cleanup()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()


class HeapTrimmer:
    """Gives the memory of large answers back to the system once they are done.

    glibc's malloc raises its mmap threshold after a large block is freed, so
    later large bodies come from the heap, which it seldom returns: with
    clients abandoning 1 MiB answers, the RSS grew by ~70 MiB per 800 and
    kept growing. Pinning the threshold low fixed that but halved the
    throughput of 1 MiB answers (every buffer mmapped and faulted in anew).
    So instead, at most every ``every`` seconds and only after large answers
    have finished, ``malloc_trim(0)`` runs in a thread: 15 ms to return
    200 MB, 0.01 ms when there is nothing to return. Elsewhere (musl, macOS)
    it does nothing.
    """

    def __init__(self, proxy: Proxy, every: float = 2.0) -> None:
        self.proxy = proxy
        self.every = every
        self._trim: Callable[[int], int] | None = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
        except (OSError, AttributeError):
            pass

    async def run(self) -> None:
        if self._trim is None:
            return
        loop = asyncio.get_running_loop()
        seen = self.proxy.large_answers
        while True:
            await asyncio.sleep(self.every)
            if self.proxy.large_answers != seen:
                seen = self.proxy.large_answers
                await loop.run_in_executor(None, self._trim, 0)


#: The shutdown watchdog of this process, once a shutdown began (see the module's text).
WATCHDOG: threading.Timer | None = None


def _exit_now(code: int, event: str, **extra: object) -> None:
    """End the process without waiting on anything (the loop may be stuck)."""
    log.error(event, extra=extra)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)


def _arm_watchdog(grace: float) -> None:
    global WATCHDOG
    if WATCHDOG is not None:
        return
    WATCHDOG = threading.Timer(
        grace,
        _exit_now,
        (1, "shutdown did not finish within shutdown_grace: exiting now"),
        {"grace_s": grace},
    )
    WATCHDOG.daemon = True
    WATCHDOG.start()


def disarm_watchdog() -> None:
    """The process is done: no watchdog may end it now (tests run servers in-process)."""
    global WATCHDOG
    if WATCHDOG is not None:
        WATCHDOG.cancel()
        WATCHDOG = None


def closing_reserve(grace: float) -> float:
    """What of the grace is kept for closing streams and stores after the drain."""
    return min(2.0, grace / 4)


async def run(settings: Settings, profile: Profile) -> int:
    server = Server(settings, profile)
    try:
        await server.start()
    except BaseException:
        # Nothing is served: close what start-up opened (the store's
        # connections and tasks), within bounds, then say why.
        _arm_watchdog(settings.shutdown_grace)
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(
                settings.shutdown_grace - closing_reserve(settings.shutdown_grace)
            ):
                await server.runner.cleanup()
        raise
    trimmer = asyncio.create_task(HeapTrimmer(server.app[PROXY]).run())
    # What start-up made (modules, the application) lives as long as the
    # process: moved out of the cyclic collector's sight, so a full
    # collection no longer scans it while every request waits (make bench:
    # plain GET p99 at 2 KiB went from ~12 ms to ~2.5 ms).
    gc.collect()
    gc.freeze()
    log.info(
        "listening",
        extra={
            "host": settings.host,
            "port": server.port,
            "admin_port": server.admin_port,
            "upstream": settings.upstream,
            "profile": profile.name,
        },
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled(signum: int) -> None:
        if stop.is_set():
            _exit_now(
                128 + signum, "second signal: exiting now", signal=signal.Signals(signum).name
            )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled, sig)
    await stop.wait()

    grace = settings.shutdown_grace
    _arm_watchdog(grace)
    trimmer.cancel()
    log.info("shutting down", extra={"grace_s": grace})
    # Stop listening, drain within the grace less what closing needs, close streams.
    await server.stop(grace - closing_reserve(grace))
    log.info("stopped")
    return 0
