"""Any request target gets a well-formed answer, on a real sidecar process.

Pipelines of requests whose targets hold random characters and
percent-escapes of any byte in each segment (``%FF``, ``%C0%AE``,
``%ED%A0%80``, ``%00``, a lone ``%``), on both profiles, by every method and
on both of the sidecar's HTTP servers (the front door's GETs, aiohttp's the
rest): every request gets an HTTP answer, the next one on the connection
too, and the sidecar's log holds no traceback and no error.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.demo.fake import FakeGptme, FakeOpencode

from ..support import SIDECAR, free_port

VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "?#")


class Upstream:
    """A fake upstream served from a thread of its own (the tests here are
    synchronous: they talk to real processes over real sockets)."""

    def __init__(self, app: web.Application) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Upstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Process:
    """A sidecar process, its log in a file."""

    def __init__(
        self, upstream: int, profile: str, front_door: bool, extra: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.log = Path(tempfile.mkdtemp(prefix="sidecar-targets-")) / "sidecar.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                *SIDECAR,
                *("--upstream", f"http://127.0.0.1:{upstream}", "--port", str(self.port)),
                *("--profile", profile, "--store", "memory", "--cache", "events"),
                "--front-door" if front_door else "--no-front-door",
                *extra,
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=clean,
            cwd=self.log.parent,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no sidecar:\n{self.log.read_text()}") from None
                time.sleep(0.05)

    def rss(self) -> int:
        """Resident memory, bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        (line,) = [x for x in status.splitlines() if x.startswith("VmRSS:")]
        return int(line.split()[1]) * 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture(scope="module", params=["gptme", "opencode"])
def sidecars(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[Process]]]:
    fake = FakeGptme("0.35.1") if request.param == "gptme" else FakeOpencode()
    with Upstream(fake.app) as upstream:
        processes = [Process(upstream.port, request.param, front) for front in (True, False)]
        try:
            yield request.param, processes
        finally:
            for process in processes:
                process.stop()


def _escape() -> st.SearchStrategy[str]:
    return st.integers(0, 255).map(lambda b: f"%{b:02X}") | st.sampled_from(
        ["%", "%4", "%zz", "%C0%AE", "%ED%A0%80", "%F0%9F%98", "%E2%82%AC", "%2F", "%2e%2E"]
    )


SEGMENT = st.lists(
    st.text(VISIBLE.replace("/", ""), min_size=1, max_size=3) | _escape(), max_size=5
).map("".join)
PREFIXES = {
    "gptme": ["/api/v2/conversations/", "/api/v2/", "/", "/api/v2/conversations/c/"],
    "opencode": ["/session/", "/", "/session/ses_0123456789abcdefghijABCDEF/", "/event/"],
}
SUFFIXES = {
    "gptme": ["", "/step", "/events", "/tool/confirm", "/config", "/"],
    "opencode": ["", "/prompt_async", "/abort", "/message", "/"],
}


@st.composite
def request_bytes(draw: st.DrawFn, profile: str) -> bytes:
    path = draw(st.sampled_from(PREFIXES[profile]))
    path += "/".join(draw(st.lists(SEGMENT, min_size=1, max_size=3)))
    path += draw(st.sampled_from(SUFFIXES[profile]))
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["", "token=x", "a=%FF", "q=%", "auth_token=%zz"]))
    method = draw(st.sampled_from(["GET", "GET", "HEAD", "POST", "DELETE", "PUT"]))
    body = b'{"session_id": "s"}' if method in ("POST", "PUT") else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def read_answers(sock: socket.socket, methods: list[str]) -> list[int]:
    """The statuses of the answers to these requests, in order."""
    data = b""
    statuses: list[int] = []
    deadline = time.monotonic() + 15
    for method in methods:
        while b"\r\n\r\n" not in data:
            data += _recv(sock, deadline)
        head, _, data = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        statuses.append(status)
        fields = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        if method == "HEAD" or status in (204, 304) or status < 200:
            continue
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            while True:
                while b"\r\n" not in data:
                    data += _recv(sock, deadline)
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(data) < size + 2:
                    data += _recv(sock, deadline)
                data = data[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(fields.get(b"content-length", b"0"))
            while len(data) < length:
                data += _recv(sock, deadline)
            data = data[length:]
    return statuses


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    chunk = sock.recv(65536)
    if not chunk:
        raise AssertionError("the sidecar closed the connection before answering every request")
    return chunk


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_every_pipelined_request_gets_an_answer(sidecars, data: st.DataObject) -> None:
    profile, processes = sidecars
    requests = data.draw(st.lists(request_bytes(profile), min_size=2, max_size=4))
    methods = [r.split(b" ", 1)[0].decode() for r in requests]
    for process in processes:
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
            sock.sendall(b"".join(requests))
            statuses = read_answers(sock, methods)
        assert all(100 <= s <= 599 for s in statuses), statuses


def test_the_log_has_no_traceback(sidecars) -> None:
    # (Runs after the property test of the same parameter: module order.)
    _, processes = sidecars
    for process in processes:
        text = process.log.read_text()
        assert "Traceback" not in text and '"exc"' not in text, text[-3000:]
        assert '"level": "error"' not in text, text[-3000:]
