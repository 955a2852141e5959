"""The fleet under faults: a short seeded run of bench/chaos.py (make chaos runs the long ones).

Three replica processes, a real redis-server and the fake upstream; a seeded
nemesis (SIGKILL, SIGSTOP past the lease, SIGTERM, Redis restarted empty and
with its data, malformed messages and records) and a checker against the
upstream's own record of every step. The program stops everything it started
however it ends; the run is bounded and its process group killed if it must.

Every check must hold in every run: (a) every outcome readable on every
replica in time, (b) no replica answering an older state than it did, (c)
one upstream stream per conversation, (d) no 5xx and every exit within the
grace. (a) and (b) were reported as an expected failure until the race of a
Redis restarted empty was fixed (see docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 19

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="make test installs redis-server"
)


@pytest.fixture(scope="module")
def chaos_run() -> str:
    command = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--seed", str(SEED),
               "--duration", "25"]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"the chaos run did not end in time:\n{out[-3000:]}") from None
    assert "violations:" in out, out[-4000:]  # it ran to its report
    return out


def violations(out: str, check: str) -> int:
    found = re.search(rf"^\({check}\) .*\|\s+(\d+)$", out, re.M)
    assert found, out
    return int(found.group(1))


def test_the_nemesis_injected_faults_and_every_replica_stayed_up(chaos_run: str) -> None:
    total = next(line for line in chaos_run.splitlines() if line.startswith("total"))
    assert int(total.split("|")[1]) >= 10, chaos_run
    assert violations(chaos_run, "c") == 0, chaos_run  # one stream per conversation
    assert violations(chaos_run, "d") == 0, chaos_run  # no 5xx, every exit within the grace


def test_every_outcome_is_read_everywhere_and_no_state_goes_back(chaos_run: str) -> None:
    assert violations(chaos_run, "a") == 0, chaos_run
    assert violations(chaos_run, "b") == 0, chaos_run
