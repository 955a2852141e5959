"""The supervisor of ``--workers``: its restart pause grows while workers keep
dying, and starts over once one has run healthily for a while.

The supervisor runs in a process of its own (it forks and takes SIGTERM), with
workers that die after 0.4 s; a SIGTERM ends it after 4 s.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, os, signal, sys, threading, time
from sidecar import workers
from sidecar.config import Settings

class Pauses(logging.Handler):
    def emit(self, record):
        if hasattr(record, "pause_s"):
            print(record.pause_s, flush=True)

logging.getLogger().addHandler(Pauses())
logging.getLogger().setLevel(logging.INFO)
workers.HEALTHY = float(sys.argv[1])
threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGTERM)).start()

def serve():
    time.sleep(0.4)
    return 1

settings = Settings(upstream="http://127.0.0.1:9", store="redis://127.0.0.1:9/0", workers=1)
sys.exit(workers.supervise(settings, serve))
"""


def pauses(healthy: float) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(healthy)], capture_output=True, text=True, timeout=30
    )
    return [float(line) for line in done.stdout.split()]


@pytest.mark.parametrize(("healthy", "grows"), [(60.0, True), (0.3, False)])
def test_the_restart_pause_starts_over_after_a_healthy_run(healthy: float, grows: bool) -> None:
    seen = pauses(healthy)
    assert len(seen) >= 2, seen
    if grows:  # workers dying young: 0.5 s, 1 s, 2 s...
        assert seen[:2] == [0.5, 1.0], seen
    else:  # each ran longer than HEALTHY: never more than the first pause
        assert set(seen) == {0.5}, seen
