"""What the conformance tests share: a witness on the upstream's own stream,
and a poller that reads the sidecar's snapshot as a REST client does.

A failed wait names what the poller saw, the sidecar's transitions and the
events the upstream really sent, side by side, so a wrong state explains
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jsonschema
import orjson

from sidecar.core.schema import snapshot_schema, webhook_schema
from sidecar.core.sse import EventDecoder

from .servers import WORKSPACE_RACE, upstream_error

__all__ = ["Poller", "Relay", "Witness", "check_merged", "check_webhook"]

_SNAPSHOT = jsonschema.Draft202012Validator(snapshot_schema())
_WEBHOOK = jsonschema.Draft202012Validator(webhook_schema())


def check_merged(state: Any) -> None:
    """Every merged object a conformance test reads fits the published schema."""
    _SNAPSHOT.validate(state)


def check_webhook(body: Any) -> None:
    """Every webhook body a conformance test receives fits the published schema."""
    _WEBHOOK.validate(body)


class Relay:
    """A TCP relay on loopback in front of an upstream, to cut its event
    streams as a network would: ``cut()`` closes every open stream's
    connection, and while ``blocked`` new ones are closed at their first
    bytes. Other requests pass."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.blocked = False
        self._streams: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def cut(self) -> None:
        for writer in list(self._streams):
            writer.transport.abort()
        self._streams.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536)
        is_stream = b"/events " in first.split(b"\r\n", 1)[0]
        if not first or (is_stream and self.blocked):
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        if is_stream:
            self._streams.add(writer)
        up_writer.write(first)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._streams.discard(writer)


class Witness:
    """Reads an upstream event stream directly and keeps every event, timed."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        keep: Callable[[dict[str, Any]], bool] = lambda event: True,
    ) -> None:
        self.http = http
        self.url = url
        self.headers = headers
        self.keep = keep
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.started = time.monotonic()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Witness:
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await self._task

    async def _read(self) -> None:
        decoder = EventDecoder(16 * 1024 * 1024)
        headers = {"Accept": "text/event-stream", **self.headers}
        async with self.http.get(self.url, headers=headers, timeout=None) as resp:
            assert resp.status == 200, f"witness: {self.url} answered {resp.status}"
            async for chunk in resp.content.iter_any():
                for event in decoder.feed(chunk):
                    self._connected.set()
                    try:
                        data = orjson.loads(event.data)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(data, dict) and self.keep(data):
                        self.events.append((time.monotonic(), data))

    def types(self) -> list[str]:
        return [_type(e) for _, e in self.events]

    def when(self, event_type: str) -> float | None:
        for at, event in self.events:
            if _type(event) == event_type:
                return at
        return None

    async def wait_for(self, event_type: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, event in self.events:
                if _type(event) == event_type:
                    return event
            await asyncio.sleep(0.01)
        raise AssertionError(f"the upstream sent no {event_type!r}:\n{self.text()}")

    def text(self) -> str:
        lines = []
        for at, event in self.events:
            kind = _type(event)
            if kind in ("generation_progress", "message.part.delta", "ping"):
                continue  # tokens and pings: one line would hide the rest
            body = orjson.dumps(event).decode()
            lines.append(f"  +{at - self.started:6.2f}s {kind}: {body[:160]}")
        return "\n".join(lines) or "  (no events)"


def _type(event: dict[str, Any]) -> str:
    return str(event.get("type"))


class Poller:
    """A REST client polling the sidecar, as the sidecar's users do."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: Callable[[str], str],
        key: str,
        headers: dict[str, str],
        sidecar: Any,
    ) -> None:
        self.http = http
        self.url = url
        self.key = key
        self.headers = headers
        self.sidecar = sidecar
        self.seen: list[str] = []  # every status a poll returned, in order
        self.upstream_errors = 0

    async def body(self, resource_id: str) -> dict[str, Any]:
        for _ in range(300):  # up to 15 s
            async with self.http.get(self.url(resource_id), headers=self.headers) as resp:
                text = await resp.text()
            if upstream_error(resp.status, text.encode()):
                # gptme 0.31.0 answers some GETs with an HTML 500: under
                # concurrent GETs, and for a while during an auto-confirmed
                # tool run ("ChatConfig has no logdir set"). Passed through as
                # it came; a poller asks again, as a real one would.
                self.upstream_errors += 1
                await asyncio.sleep(0.05)
                continue
            break
        assert resp.status == 200, f"GET {self.url(resource_id)}: {resp.status} {text}"
        doc = dict(orjson.loads(text))
        check_merged(doc[self.key])
        return doc

    async def state(self, resource_id: str) -> dict[str, Any]:
        state = dict((await self.body(resource_id))[self.key])
        if not self.seen or self.seen[-1] != state["status"]:
            self.seen.append(state["status"])
        return state

    async def wait(
        self,
        resource_id: str,
        check: Callable[[dict[str, Any]], bool] | str,
        witness: Witness | None = None,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        """Poll every 20 ms until ``check`` holds (a status, or a predicate)."""
        test = (lambda s: s["status"] == check) if isinstance(check, str) else check
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = await self.state(resource_id)
            if test(state):
                return state
            if re.search(WORKSPACE_RACE, str(state.get("last_error"))):
                break  # gptme 0.31.0 failed the step itself: no use waiting (it is rerun)
            await asyncio.sleep(0.02)
        raise AssertionError(
            self.explain(resource_id, f"waited {timeout:g} s for {check}", state, witness)
        )

    def explain(
        self,
        resource_id: str,
        what: str,
        state: dict[str, Any],
        witness: Witness | None,
    ) -> str:
        conv = self.sidecar.registry.get(resource_id)
        transitions = conv.transitions if conv is not None else []
        lines = [
            f"{what}; the last poll read {orjson.dumps(state).decode()}",
            f"statuses polls returned: {self.seen}",
            "the sidecar's transitions:",
            *(
                f"  {t['at']} {t['status']} stream={t['stream']} {t['last_error'] or ''}"
                for t in transitions
            ),
            "what the upstream sent (read directly):",
            witness.text() if witness is not None else "  (not watched)",
        ]
        return "\n".join(lines)
