"""``workers = N``: N processes serve one port, each a replica of the fleet.

The parent forks the workers before any event loop exists, then only
supervises: each worker binds the port with ``SO_REUSEPORT`` (the kernel
spreads new connections over them) and shares its snapshots through the
``redis://`` store, as replicas in separate pods do. A worker that dies is
started again after a pause that doubles while workers keep dying (0.5 s
up to 30 s) and is back to 0.5 s once a worker has run for ``HEALTHY``
seconds (a crash a day must not wait 30 s because of last week's); SIGTERM or
SIGINT is passed to every worker, and the parent exits once they have, with
the first non-zero status among them (0 if none).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from .config import Settings

__all__ = ["supervise"]

log = logging.getLogger("sidecar.workers")

FIRST_PAUSE = 0.5
MAX_PAUSE = 30.0
#: A worker that ran this long before it ended was healthy: the pause starts over.
HEALTHY = 60.0


def supervise(settings: Settings, serve: Callable[[], int]) -> int:
    workers: dict[int, int] = {}  # pid: slot
    started: dict[int, float] = {}  # pid: when (monotonic)
    stopping = False
    status = 0

    def start(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = serve()
            finally:
                os._exit(code)
        workers[pid] = slot
        started[pid] = time.monotonic()

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(settings.workers):
        start(slot)
    log.info("workers started", extra={"workers": settings.workers, "pids": sorted(workers)})
    pause = FIRST_PAUSE
    while workers:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in workers:
            continue
        slot = workers.pop(pid)
        ran = time.monotonic() - started.pop(pid, time.monotonic())
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            if code not in (0, -signal.SIGTERM, -signal.SIGINT) and status == 0:
                status = code if code > 0 else 1
            continue
        if ran >= HEALTHY:
            pause = FIRST_PAUSE
        log.warning(
            "worker ended: starting another",
            extra={"pid": pid, "exit": code, "ran_s": round(ran, 1), "pause_s": pause},
        )
        time.sleep(pause)
        pause = min(pause * 2, MAX_PAUSE)
        if not stopping:
            start(slot)
    return status
