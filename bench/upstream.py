"""A fast stream-first upstream for benchmarks: prebuilt gptme-shaped bodies and SSE.

    python bench/upstream.py --port 5701

* ``GET /api/v2/conversations/{id}`` (an enrich target) and ``GET /plain/{id}``
  (not one) answer the same prebuilt conversation JSON: ``c2k``, ``c64k`` and
  ``c1m`` are 2 KiB, 64 KiB and 1 MiB; any other id gets a small body.
* ``GET /api/v2/conversations/{id}/events`` sends ``connected`` and a ping,
  then idles (pinging every 15 s), except for the control streams below.
* ``POST /control/burst?n=N`` writes N token events to the ``burst`` stream as
  fast as it can.
* ``POST /control/emit`` writes one state-changing event to the ``latency``
  stream and answers the ``time.monotonic()`` at which it was written;
  ``POST /control/flips?n=N`` writes N of them (``generation_started`` and
  ``error`` in turn: N transitions) as fast as it can.
* ``GET /api/v2/conversations`` answers a list of ``LISTED`` (100)
  conversations shaped as gptme 0.35.1 lists them (ids ``l0``...);
  ``GET /plain-list`` the same bytes on a path no profile lists.
* ``POST /hooks`` is a webhook receiver: it answers 204 and notes when each
  delivery arrived (``time.monotonic()``); ``GET /control/hooks`` tells them,
  ``POST /control/hooks/reset`` forgets them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import orjson
from aiohttp import web

SIZES = {"c2k": 2 * 1024, "c64k": 64 * 1024, "c1m": 1024 * 1024}
HEARTBEAT = 15.0
LISTED = 100


def listing(count: int) -> bytes:
    """A conversation list as gptme 0.35.1 answers it, newest first."""
    items = [
        {
            "agent_avatar": None, "agent_name": None, "agent_path": None, "agent_urls": None,
            "branches": 1, "created": 1796000000.0 + i, "id": f"l{i}",
            "last_message_preview": "please run the tests and tell me what failed",
            "last_message_role": "user", "last_updated": 1796000100.0 - i,
            "message_count": 12, "messages": 12, "model": "local/fake", "models_usage": {},
            "modified": 1796000100.0 - i, "name": f"conversation {i}",
            "path": f"/data/logs/l{i}/conversation.jsonl", "total_cache_read_tokens": 0,
            "total_cost": 0.0, "total_input_tokens": 0, "total_output_tokens": 0,
            "workspace": f"/data/logs/l{i}/workspace",
        }
        for i in range(count)
    ]  # fmt: skip
    return orjson.dumps(items)


def conversation(cid: str, size: int) -> bytes:
    message = {
        "role": "assistant",
        "content": "The quick brown fox jumps over the lazy dog. " * 4,
        "timestamp": "2026-11-24T01:00:00+00:00",
    }
    doc = {"id": cid, "name": cid, "log": [], "branches": {}, "logfile": f"/data/{cid}.jsonl"}
    while len(orjson.dumps(doc)) < size:
        doc["log"].append(message)
    return orjson.dumps(doc)


class Upstream:
    def __init__(self) -> None:
        self.bodies = {cid: conversation(cid, size) for cid, size in SIZES.items()}
        self.small = conversation("small", 512)
        self.list_body = listing(LISTED)
        self.arrivals: list[float] = []
        self.streams: dict[str, list[web.StreamResponse]] = {}
        self.flip = False
        self.tasks: set[asyncio.Task[None]] = set()
        app = web.Application()
        app.router.add_get("/api/v2", self.root)
        app.router.add_get("/api/v2/conversations", self.list)
        app.router.add_get("/plain-list", self.list)
        app.router.add_get("/api/v2/conversations/{id}", self.get)
        app.router.add_get("/plain/{id}", self.get)
        app.router.add_get("/api/v2/conversations/{id}/events", self.events)
        app.router.add_post("/control/burst", self.burst)
        app.router.add_post("/control/emit", self.emit)
        app.router.add_post("/control/flips", self.flips)
        app.router.add_post("/hooks", self.hook)
        app.router.add_get("/control/hooks", self.hooks)
        app.router.add_post("/control/hooks/reset", self.hooks_reset)
        app.router.add_post("/control/soak", self.soak)
        app.on_shutdown.append(self.end_streams)
        self.app = app

    async def end_streams(self, app: web.Application) -> None:
        for task in list(self.tasks):
            task.cancel()
        for streams in self.streams.values():
            for resp in streams:
                if resp.task is not None:
                    resp.task.cancel()

    async def root(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "bench upstream"})

    async def list(self, request: web.Request) -> web.Response:
        return web.Response(body=self.list_body, content_type="application/json")

    async def hook(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrivals.append(time.monotonic())
        return web.Response(status=204)

    async def hooks(self, request: web.Request) -> web.Response:
        return web.json_response({"arrivals": self.arrivals})

    async def hooks_reset(self, request: web.Request) -> web.Response:
        self.arrivals = []
        return web.json_response({})

    async def flips(self, request: web.Request) -> web.Response:
        n = int(request.query.get("n", "1000"))
        started = time.monotonic()
        for resp in list(self.streams.get("latency", [])):
            with contextlib.suppress(ConnectionResetError):  # a sidecar that left
                for i in range(n):
                    flip = i % 2 == 0
                    event = (
                        b'{"type": "generation_started"}'
                        if flip
                        else b'{"type": "error", "error": "x"}'
                    )
                    await resp.write(b"data: " + event + b"\n\n")
        return web.json_response({"t": started})

    async def get(self, request: web.Request) -> web.Response:
        body = self.bodies.get(request.match_info["id"], self.small)
        return web.Response(body=body, content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["id"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(
            b'data: {"type": "connected", "session_id": "s"}\n\ndata: {"type": "ping"}\n\n'
        )
        self.streams.setdefault(cid, []).append(resp)
        try:
            while True:
                await asyncio.sleep(HEARTBEAT)
                await resp.write(b'data: {"type": "ping"}\n\n')
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.streams[cid].remove(resp)
        return resp

    async def burst(self, request: web.Request) -> web.Response:
        n = int(request.query.get("n", "100000"))
        event = b'data: {"type": "generation_progress", "token": "tok "}\n\n'
        chunk = event * 1000
        started = time.monotonic()
        for resp in list(self.streams.get("burst", [])):
            await resp.write(b'data: {"type": "generation_started"}\n\n')
            for _ in range(n // 1000):
                await resp.write(chunk)
            await resp.write(b'data: {"type": "generation_complete", "message": {}}\n\n')
        return web.json_response({"written": n, "seconds": time.monotonic() - started})

    async def soak(self, request: web.Request) -> web.Response:
        """Make conversations soak-0..N-1 stream steps for `seconds`: tokens, then an outcome."""
        n = int(request.query.get("conversations", "100"))
        seconds = float(request.query.get("seconds", "600"))
        rate = float(request.query.get("tokens_per_s", "20"))
        for i in range(n):
            task = asyncio.create_task(self._soak_one(f"soak-{i}", seconds, rate, i))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return web.json_response({"conversations": n})

    async def _soak_one(self, cid: str, seconds: float, rate: float, i: int) -> None:
        end = time.monotonic() + seconds
        step = 0
        while time.monotonic() < end:
            step += 1
            self._send(cid, b'{"type": "generation_started"}')
            for _ in range(int(rate * 3)):  # a 3 s step
                self._send(cid, b'{"type": "generation_progress", "token": "tok "}')
                await asyncio.sleep(1 / rate)
            outcome = (
                b'{"type": "error", "error": "soak %d"}' % step
                if (step + i) % 3 == 0
                else (b'{"type": "generation_complete", "message": {}}')
            )
            self._send(cid, outcome)
            await asyncio.sleep(0.5)

    def _send(self, cid: str, event: bytes) -> None:
        for resp in self.streams.get(cid, []):
            task = asyncio.create_task(resp.write(b"data: " + event + b"\n\n"))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def emit(self, request: web.Request) -> web.Response:
        self.flip = not self.flip
        event = (
            b'{"type": "generation_started"}' if self.flip else b'{"type": "error", "error": "x"}'
        )
        written = time.monotonic()
        for resp in list(self.streams.get("latency", [])):
            with contextlib.suppress(ConnectionResetError):  # a sidecar that left
                await resp.write(b"data: " + event + b"\n\n")
        return web.json_response({"t": written})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    web.run_app(
        Upstream().app,
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop() if uvloop else None,
    )


if __name__ == "__main__":
    main()
