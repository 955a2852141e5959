"""Helpers the tests share: the sidecar as a command, free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

__all__ = ["SIDECAR", "free_port", "run"]

SIDECAR = [sys.executable, "-m", "sidecar"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run(
        [*SIDECAR, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )
