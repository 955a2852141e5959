"""Stream-first upstreams that behave like gptme's v2 server and opencode's, traps included.

They back the built-in demo and the fast tests; the released servers are the
reference (``tests/test_real_*.py`` run the same scenarios against them, and
docs/real-servers.md lists what each sends). Not
idealised: ``/step`` answers before any event (0.31.0), or waits for the
first token and turns an early error into a 500 (0.35.1); events go to every
subscriber of a conversation; the ``connected`` event carries the new
session's state only in 0.35.1, which also ends every step with
``step_complete``; a confirmed or skipped tool is followed by a new
generation, and no event names a skipped tool; an interrupt is followed by
late events; GET reports the wrong session's state with more than one
subscriber (0.35.1); auth, Host checks, compression and a weak ETag computed
from the log alone can be switched on. Faults can be injected: drop every
stream, go silent without closing (half-open), or restart and forget every
session.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ..http.codings import zstd

try:
    import brotli
except ImportError:  # pragma: no cover
    brotli = None

__all__ = ["FakeGptme", "FakeOpencode", "Outcome"]


def _choose_coding(accept: str) -> str | None:
    """The coding gptme 0.35.1 answers in (Flask-Compress 1.25): the highest
    q-value, ties to zstd, br, gzip in that order; ``*`` only when nothing
    named is known; None: identity. (It would also do deflate: not faked.)"""
    known = ("zstd", "br", "gzip") if brotli is not None else ("zstd", "gzip")
    by_q: dict[float, set[str | None]] = {}
    anything = False
    for part in accept.lower().split(","):
        coding, _, params = part.strip().partition(";")
        coding = coding.strip()
        try:
            q = float(params.split("=")[1]) if "q=" in params else 1.0
        except (ValueError, IndexError):
            q = 1.0
        if coding == "*":
            anything = anything or q > 0
        elif coding == "identity":
            by_q.setdefault(q, set()).add(None)
        elif coding in known:
            by_q.setdefault(q, set()).add(coding)
    for _, codings in sorted(by_q.items(), reverse=True):
        if len(codings) == 1:
            return codings.pop()
        if codings:
            return next(c for c in known if c in codings)
    return known[0] if anything else None


INVALID_KEY_ERROR = (
    "Error code: 401 - {'error': {'message': 'Incorrect API key provided', "
    "'type': 'invalid_request_error', 'code': 'invalid_api_key'}}"
)


@dataclass
class Outcome:
    """What the fake model does when a step runs."""

    kind: str = "success"  # success | error | tool
    tokens: int = 5
    pace: float = 0.01  # seconds between tokens
    error: str = INVALID_KEY_ERROR
    error_after: int = 0  # tokens produced before an error
    start_delay: float = 0.0  # before generation_started (0.31.0's gap)
    tool: str = "shell"
    tool_seconds: float = 0.0  # how long a confirmed tool runs


@dataclass
class Session:
    id: str
    conversation: str
    generating: bool = False
    last_error: str | None = None
    pending_tools: dict[str, Any] = field(default_factory=dict)
    activity: int = 0
    auto_confirm: bool = False


@dataclass
class Conversation:
    id: str
    log: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    #: When the log last changed (the list's ``modified``, epoch seconds).
    modified: float = field(default_factory=time.time)
    subscribers: list[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    interrupted: bool = False  # the task is being cancelled by an interrupt


class FakeGptme:
    def __init__(
        self,
        version: str = "0.31.0",
        *,
        token: str | None = None,
        allowed_hosts: set[str] | None = None,
        compress: bool | None = None,
        etag: bool | None = None,
        heartbeat: float = 15.0,
        outcome: Outcome | None = None,
        get_delay: float = 0.0,
        step_answer_delay: float = 0.0,
    ) -> None:
        if version not in ("0.31.0", "0.35.1"):
            raise ValueError(f"unknown version {version!r}")
        modern = version == "0.35.1"
        self.version = version
        self.token = token
        self.allowed_hosts = allowed_hosts
        self.compress = modern if compress is None else compress
        self.etag = modern if etag is None else etag
        self.heartbeat = heartbeat
        self.outcome = outcome or Outcome()
        #: Seconds a conversation's GET takes (the real server's is ~70 ms at 64 KiB).
        self.get_delay = get_delay
        #: Seconds a step's answer waits once the step runs (a slow or distant
        #: upstream: the proxy forwarding it may be lost before the answer).
        self.step_answer_delay = step_answer_delay
        #: Conversation GETs being answered now (while delayed), and the most so far.
        self.gets_at_once = 0
        self.most_gets_at_once = 0
        self.conversations: dict[str, Conversation] = {}
        self.sessions: dict[str, Session] = {}
        self.silent = False
        self.requests: list[tuple[str, str]] = []  # (method, raw path) seen
        self.accept_encodings: list[tuple[str, str | None]] = []  # (raw path, header)
        #: The outcome of a conversation's next step, if planned (else ``outcome``).
        self.planned: dict[str, Outcome] = {}
        #: The upstream's own record of every step that ended, in order:
        #: (conversation, "completed" or "failed", the error text or None).
        self.ledger: list[tuple[str, str, str | None]] = []
        self._activity = itertools.count(1)
        self.app = self._build()

    @property
    def modern(self) -> bool:
        return self.version == "0.35.1"

    # ---------------------------------------------------------- faults
    def drop_streams(self) -> None:
        """Close every open event stream, as a crash or a proxy reset would."""
        for conv in self.conversations.values():
            for queue in conv.subscribers:
                queue.put_nowait(None)

    def go_silent(self, silent: bool = True) -> None:
        """Keep streams open but send nothing, not even pings (half-open)."""
        self.silent = silent

    def restart(self) -> None:
        """Forget sessions and running work; conversation logs survive."""
        self.drop_streams()
        for conv in self.conversations.values():
            if conv.task is not None:
                conv.task.cancel()
            conv.subscribers.clear()
        self.sessions.clear()

    def subscriber_count(self, conversation_id: str) -> int:
        conv = self.conversations.get(conversation_id)
        return len(conv.subscribers) if conv else 0

    # --------------------------------------------------------- helpers
    def broadcast(self, conversation_id: str, event: dict[str, Any]) -> None:
        conv = self.conversations.get(conversation_id)
        if conv is None:
            return
        tick = next(self._activity)
        for session in self.sessions.values():
            if session.conversation == conversation_id:
                session.activity = tick  # every event touches every session
        for queue in conv.subscribers:
            queue.put_nowait(event)

    def _json(self, request: web.Request, body: Any, status: int = 200) -> web.Response:
        raw = orjson.dumps(body)
        headers = {"Content-Type": "application/json"}
        if self.compress:
            headers["Vary"] = "Accept-Encoding"
            coding = _choose_coding(request.headers.get("Accept-Encoding", ""))
            if coding == "zstd":
                raw, headers["Content-Encoding"] = zstd.compress(raw, level=3), coding
            elif coding == "br":
                raw, headers["Content-Encoding"] = brotli.compress(raw), coding
            elif coding == "gzip":
                raw, headers["Content-Encoding"] = gzip.compress(raw), coding
        return web.Response(body=raw, status=status, headers=headers)

    def _session_for(self, conversation_id: str) -> Session:
        session = Session(uuid.uuid4().hex[:12], conversation_id, activity=next(self._activity))
        self.sessions[session.id] = session
        return session

    # ------------------------------------------------------ middleware
    def _build(self) -> web.Application:
        @web.middleware
        async def gate(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            self.requests.append((request.method, request.raw_path))
            self.accept_encodings.append((request.raw_path, request.headers.get("Accept-Encoding")))
            if self.allowed_hosts is not None:
                host = (request.host or "").rsplit(":", 1)[0]
                if host not in self.allowed_hosts:
                    return self._json(request, {"error": f"Invalid host: {host}"}, 403)
            if self.token is not None:
                # 0.35.1 takes the bearer token, else a `?token=` parameter.
                given = request.headers.get("Authorization")
                if given != f"Bearer {self.token}" and (
                    given is not None or request.query.get("token") != self.token
                ):
                    return self._json(request, {"error": "Unauthorized"}, 401)
            return await handler(request)

        async def end_streams(app: web.Application) -> None:
            self.drop_streams()  # on shutdown, streams end instead of holding it up

        app = web.Application(middlewares=[gate])
        app.on_shutdown.append(end_streams)
        conv = "/api/v2/conversations/{id}"
        app.router.add_get("/api/v2", self._root)
        app.router.add_get("/api/v2/conversations", self._list)
        app.router.add_put(conv, self._create)
        app.router.add_get(conv, self._get)
        app.router.add_post(conv, self._append)
        app.router.add_post(conv + "/step", self._step)
        app.router.add_get(conv + "/events", self._events)
        app.router.add_post(conv + "/tool/confirm", self._confirm)
        app.router.add_post(conv + "/interrupt", self._interrupt)
        return app

    # --------------------------------------------------------- routes
    async def _root(self, request: web.Request) -> web.Response:
        return self._json(request, {"message": "gptme v2 API", "version": self.version})

    async def _list(self, request: web.Request) -> web.Response:
        """As the real list answers: newest first, ``limit`` (default 100);
        0.35.1 adds a few fields, tags the array with a weak ETag (a matching
        ``If-None-Match`` gets a 304), and with ``paginated=1`` answers an
        object ``{conversations, next_cursor}`` instead (0.31.0 ignores it)."""
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return self._json(request, {"error": "limit must be an integer"}, 400)
        newest = sorted(self.conversations.values(), key=lambda c: c.modified, reverse=True)
        items: list[dict[str, Any]] = []
        for conv in newest[:limit]:
            item: dict[str, Any] = {
                "agent_name": None,
                "agent_path": None,
                "branches": 1,
                "created": conv.created,
                "id": conv.id,
                "messages": len(conv.log),
                "modified": conv.modified,
                "name": conv.id,
                "path": f"/data/conversations/{conv.id}/conversation.jsonl",
                "workspace": "/data/workspace",
            }
            if self.modern:
                item |= {"last_updated": conv.modified, "message_count": len(conv.log)}
            items.append(item)
        paginated = request.query.get("paginated")
        if self.modern and paginated is not None and paginated.lower() in ("", "1", "true", "yes"):
            more = len(newest) > limit
            cursor = f"{items[-1]['modified']}|{items[-1]['id']}" if more and items else None
            return self._json(request, {"conversations": items, "next_cursor": cursor})
        response = self._json(request, items)
        if self.modern:
            etag = 'W/"' + hashlib.sha1(orjson.dumps(items)).hexdigest()[:16] + '"'
            if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
                return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
            response.headers["ETag"] = etag
            response.headers["Cache-Control"] = "no-cache"
        return response

    async def _create(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        if cid in self.conversations:
            return self._json(request, {"error": f"Conversation already exists: {cid}"}, 409)
        body = await request.json()
        self.conversations[cid] = Conversation(cid, log=list(body.get("messages", [])))
        session = self._session_for(cid)
        return self._json(
            request, {"status": "ok", "conversation_id": cid, "session_id": session.id}
        )

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if self.get_delay:
            self.gets_at_once += 1
            self.most_gets_at_once = max(self.most_gets_at_once, self.gets_at_once)
            try:
                await asyncio.sleep(self.get_delay)
            finally:
                self.gets_at_once -= 1
        cid = request.match_info["id"]
        conv = self.conversations.get(cid)
        if conv is None:
            return self._json(request, {"error": f"Conversation not found: {cid}"}, 404)
        etag = None
        if self.etag:
            # Computed from the log alone, and checked before the session
            # field is built: a 304 can hide a change of state.
            etag = 'W/"' + hashlib.sha1(orjson.dumps(conv.log)).hexdigest()[:16] + '"'
            inm = request.headers.get("If-None-Match", "")
            if etag in [t.strip() for t in inm.split(",")]:
                return web.Response(status=304, headers={"ETag": etag})
        body: dict[str, Any] = {
            "id": cid,
            "name": cid,
            "log": conv.log,
            "branches": {"main": conv.log},
            "logfile": f"/data/conversations/{cid}/conversation.jsonl",
            "workspace": "/data/workspace",
        }
        if self.modern:
            sessions = [s for s in self.sessions.values() if s.conversation == cid]
            if sessions:
                # Every event touches every session, so on a tie the newest
                # session (an observer) is the one reported, as in 0.35.1.
                newest = max(reversed(sessions), key=lambda s: s.activity)
                body["session"] = {
                    "id": newest.id,
                    "generating": newest.generating,
                    "last_error": newest.last_error,
                }
        response = self._json(request, body)
        if etag:
            response.headers["ETag"] = etag
        return response

    async def _append(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        conv = self.conversations.get(cid)
        if conv is None:
            return self._json(request, {"error": f"Conversation not found: {cid}"}, 404)
        message = await request.json()
        conv.log.append(message)
        conv.modified = time.time()
        self.broadcast(cid, {"type": "message_added", "message": message})
        return self._json(request, {"status": "ok"})

    async def _step(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        conv = self.conversations.get(cid)
        if conv is None:
            return self._json(request, {"error": f"Conversation not found: {cid}"}, 404)
        body = await request.json()
        session = self.sessions.get(body.get("session_id", ""))
        if session is None:
            return self._json(request, {"error": "Session not found"}, 404)
        if session.generating:
            return self._json(request, {"error": "Generation already in progress"}, 409)
        session.auto_confirm = bool(body.get("auto_confirm"))
        first = self._start(conv, session, self.planned.pop(cid, self.outcome))
        if self.step_answer_delay:
            await asyncio.sleep(self.step_answer_delay)
        if self.modern:
            # 0.35.1 waits up to 5 s for the first token or an early error.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(first), 5.0)
            if first.done() and first.result() is not None:
                return self._json(request, {"status": "error", "error": first.result()}, 500)
        return self._json(request, {"status": "ok", "message": "Step started"})

    def _start(
        self, conv: Conversation, session: Session, outcome: Outcome
    ) -> asyncio.Future[str | None]:
        """Run a generation in the background; the future settles at its first token."""
        first = asyncio.get_running_loop().create_future()
        session.generating = True
        session.last_error = None
        conv.task = asyncio.create_task(self._generate(conv, session, outcome, first))
        return first

    def _end_step(self, cid: str) -> None:
        if self.modern:
            self.broadcast(cid, {"type": "step_complete"})

    async def _generate(
        self,
        conv: Conversation,
        session: Session,
        outcome: Outcome,
        first: asyncio.Future[str | None],
    ) -> None:
        def settle(value: str | None) -> None:
            if not first.done():
                first.set_result(value)

        produced: list[str] = []
        try:
            await asyncio.sleep(outcome.start_delay)
            self.broadcast(conv.id, {"type": "generation_started"})
            for i in range(outcome.tokens):
                if outcome.kind == "error" and i == outcome.error_after:
                    break
                token = f"tok{i} "
                produced.append(token)
                self.broadcast(conv.id, {"type": "generation_progress", "token": token})
                settle(None)
                await asyncio.sleep(outcome.pace)
            if outcome.kind == "error":
                session.last_error = outcome.error
                session.generating = False
                if self.modern:
                    note = {"role": "system", "content": f"Error: {outcome.error}"}
                    self.broadcast(conv.id, {"type": "message_added", "message": note})
                self.broadcast(conv.id, {"type": "error", "error": outcome.error})
                self.ledger.append((conv.id, "failed", outcome.error))
                self._end_step(conv.id)
                settle(outcome.error)
                return
            message = {"role": "assistant", "content": "".join(produced)}
            conv.log.append(message)
            conv.modified = time.time()
            self.broadcast(conv.id, {"type": "message_added", "message": message})
            self.broadcast(conv.id, {"type": "generation_complete", "message": message})
            session.generating = False
            settle(None)
            if outcome.kind != "tool":
                self.ledger.append((conv.id, "completed", None))
            if outcome.kind == "tool":
                await self._propose_tool(conv, session, outcome)
            else:
                self._end_step(conv.id)
        except asyncio.CancelledError:
            if not conv.interrupted:
                raise  # the server went away: nothing more is sent
            # Interrupted: 0.31.0 still sends the cut-off answer and a
            # generation_complete; 0.35.1 flushes one last token.
            conv.interrupted = False
            if self.modern:
                self.broadcast(conv.id, {"type": "generation_progress", "token": "…"})
            else:
                await asyncio.sleep(0.05)
                message = {"role": "assistant", "content": "".join(produced) + " [INTERRUPTED]"}
                conv.log.append(message)
                conv.modified = time.time()
                self.broadcast(conv.id, {"type": "message_added", "message": message})
                self.broadcast(conv.id, {"type": "generation_complete", "message": message})
        finally:
            settle(None)
            session.generating = False

    async def _propose_tool(self, conv: Conversation, session: Session, outcome: Outcome) -> None:
        tool_id = uuid.uuid4().hex[:8]
        tooluse = {"tool": outcome.tool, "args": [], "content": "ls"}
        auto = session.auto_confirm
        self.broadcast(
            conv.id,
            {"type": "tool_pending", "tool_id": tool_id, "tooluse": tooluse, "auto_confirm": auto},
        )
        self._end_step(conv.id)  # 0.35.1 ends the step here, even when the tool runs next
        if auto:
            await self._run_tool(conv, session, tool_id, outcome)
        else:
            session.pending_tools[tool_id] = tooluse

    async def _run_tool(
        self, conv: Conversation, session: Session, tool_id: str, outcome: Outcome
    ) -> None:
        """Run a confirmed tool, then generate again: the model reads its output."""
        self.broadcast(conv.id, {"type": "tool_executing", "tool_id": tool_id})
        await asyncio.sleep(outcome.tool_seconds)
        output = {"role": "system", "content": "Ran command: `ls`\n\nfile.txt\n"}
        conv.log.append(output)
        conv.modified = time.time()
        if self.modern:
            self.broadcast(conv.id, {"type": "tool_output", "tool_id": tool_id, "output": "x"})
        self.broadcast(conv.id, {"type": "message_added", "message": output})
        if self.modern:
            self.broadcast(
                conv.id,
                {"type": "tool_complete", "tool_id": tool_id, "duration_ms": 3, "success": True},
            )
        await self._generate(conv, session, Outcome(tokens=2), asyncio.Future())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["id"]
        conv = self.conversations.get(cid)
        if conv is None:
            return self._json(request, {"error": f"Conversation not found: {cid}"}, 404)
        session = self.sessions.get(request.query.get("session_id", ""))
        if session is None:
            session = self._session_for(cid)  # without session_id: a new session
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        conv.subscribers.append(queue)
        connected: dict[str, Any] = {"type": "connected", "session_id": session.id}
        if self.modern:
            connected.update(
                generating=session.generating,
                last_error=session.last_error,
                pending_tools=[{"tool_id": k, **v} for k, v in session.pending_tools.items()],
            )
        try:
            await self._send_event(response, connected)
            await self._send_event(response, {"type": "ping"})
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), self.heartbeat)
                except TimeoutError:
                    event = {"type": "ping"}
                if event is None:
                    break
                if not self.silent:
                    await self._send_event(response, event)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(ValueError):
                conv.subscribers.remove(queue)
        return response

    @staticmethod
    async def _send_event(response: web.StreamResponse, event: dict[str, Any]) -> None:
        await response.write(b"data: " + orjson.dumps(event) + b"\n\n")

    async def _confirm(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        body = await request.json()
        session = self.sessions.get(body.get("session_id", ""))
        if session is None:
            return self._json(request, {"error": "Session not found"}, 404)
        tool_id = body.get("tool_id", "")
        if tool_id not in session.pending_tools:
            return self._json(request, {"error": f"Tool not found: {tool_id}"}, 404)
        action = body.get("action")
        if action not in ("confirm", "edit", "skip", "auto"):
            return self._json(request, {"error": f"Unknown action: {action}"}, 400)
        del session.pending_tools[tool_id]
        conv = self.conversations[cid]
        session.generating = True
        if action == "skip":
            # No event names the skipped tool: only the request body does.
            text = (
                "User chose not to execute this tool." if self.modern else f"Skipped tool {tool_id}"
            )
            note = {"role": "system", "content": text}
            conv.log.append(note)
            conv.modified = time.time()
            self.broadcast(cid, {"type": "message_added", "message": note})
            conv.task = asyncio.create_task(
                self._generate(conv, session, Outcome(tokens=2), asyncio.Future())
            )
        else:
            conv.task = asyncio.create_task(self._run_tool(conv, session, tool_id, self.outcome))
        return self._json(request, {"status": "ok", "message": f"Tool {action}ed"})

    async def _interrupt(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        body = await request.json()
        session = self.sessions.get(body.get("session_id", ""))
        if session is None:
            return self._json(request, {"error": "Session not found"}, 404)
        conv = self.conversations[cid]
        session.generating = False
        session.pending_tools.clear()
        self.broadcast(cid, {"type": "interrupted"})
        if conv.task is not None and not conv.task.done():
            conv.interrupted = True
            conv.task.cancel()  # its late events follow the interrupt
        return self._json(request, {"status": "ok", "message": "Interrupted"})


class FakeOpencode:
    """An opencode-style upstream (opencode-ai 1.18.33): one shared ``/event`` stream.

    ``POST /session/{id}/prompt_async`` answers 204 and runs the outcome in
    the background. Every end of work, a failure included, is followed by
    ``session.status`` idle and ``session.idle``; a failure is a
    ``session.error`` event that ``GET /session/{id}`` never shows; an abort
    is a ``session.error`` named ``MessageAbortedError``; a tool outcome asks
    a permission (``permission.asked``, answered by
    ``POST /permission/{id}/reply``); ``retries`` model calls fail first
    (``session.status`` retry).
    """

    def __init__(
        self, outcome: Outcome | None = None, heartbeat: float = 10.0, retries: int = 0
    ) -> None:
        self.outcome = outcome or Outcome()
        self.heartbeat = heartbeat
        self.retries = retries
        self.sessions: dict[str, dict[str, Any]] = {}
        self.busy: dict[str, asyncio.Task[None]] = {}
        self.permissions: dict[str, dict[str, Any]] = {}
        self._replies: dict[str, asyncio.Future[str]] = {}
        self.subscribers: list[asyncio.Queue[dict[str, Any] | None]] = []
        self.requests: list[tuple[str, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/session", self._list)
        app.router.add_post("/session", self._create)
        app.router.add_get("/session/status", self._status)
        app.router.add_get("/session/{id}", self._get)
        app.router.add_post("/session/{id}/prompt_async", self._prompt)
        app.router.add_post("/session/{id}/abort", self._abort)
        app.router.add_get("/permission", self._permissions)
        app.router.add_post("/permission/{id}/reply", self._reply)
        app.router.add_get("/event", self._events)
        app.on_shutdown.append(self._end_streams)
        self.app = app

    @staticmethod
    def new_id(prefix: str) -> str:
        """An id as opencode makes them: a prefix, "_", and 26 letters and digits."""
        return prefix + "_" + uuid.uuid4().hex[:12] + uuid.uuid4().hex[:14]

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.raw_path))
        return await handler(request)

    async def _end_streams(self, app: web.Application) -> None:
        for queue in self.subscribers:
            queue.put_nowait(None)

    def broadcast(self, event_type: str, **properties: Any) -> None:
        event = {"id": self.new_id("evt"), "type": event_type, "properties": properties}
        for queue in self.subscribers:
            queue.put_nowait(event)

    async def _list(self, request: web.Request) -> web.Response:
        """Newest first, as the real one (``time.updated``, epoch milliseconds)."""
        newest = sorted(self.sessions.values(), key=lambda s: s["time"]["updated"], reverse=True)
        return web.json_response(newest)

    async def _create(self, request: web.Request) -> web.Response:
        sid = self.new_id("ses")
        now = int(time.time() * 1000)
        self.sessions[sid] = {
            "id": sid,
            "title": "New session",
            "version": "1.18.33",
            "time": {"created": now, "updated": now},
        }
        self.broadcast("session.created", sessionID=sid, info=self.sessions[sid])
        return web.json_response(self.sessions[sid])

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({sid: {"type": "busy"} for sid in self.busy})

    async def _get(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return web.json_response({"name": "NotFoundError"}, status=404)
        return web.json_response(session)

    async def _prompt(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        if sid not in self.sessions:
            return web.json_response({"name": "NotFoundError"}, status=404)
        await request.read()
        self.sessions[sid]["time"]["updated"] = int(time.time() * 1000)
        task = asyncio.create_task(self._run(sid, self.outcome))
        self.busy[sid] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.Response(status=204)

    async def _abort(self, request: web.Request) -> web.Response:
        task = self.busy.get(request.match_info["id"])
        if task is not None:
            task.cancel()
        return web.json_response(True)

    async def _permissions(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.permissions.values()))

    async def _reply(self, request: web.Request) -> web.Response:
        pid = request.match_info["id"]
        waiter = self._replies.pop(pid, None)
        if waiter is None:
            return web.json_response({"name": "NotFoundError"}, status=404)
        reply = (await request.json()).get("reply", "once")
        waiter.set_result(reply)
        return web.json_response(True)

    def _idle(self, sid: str) -> None:
        self.broadcast("session.status", sessionID=sid, status={"type": "idle"})
        self.broadcast("session.idle", sessionID=sid)

    async def _run(self, sid: str, outcome: Outcome) -> None:
        busy = {"type": "busy"}
        try:
            await asyncio.sleep(outcome.start_delay)
            self.broadcast("session.status", sessionID=sid, status=busy)
            self.broadcast("session.status", sessionID=sid, status=busy)
            for attempt in range(1, self.retries + 1):
                due = int((time.time() + outcome.pace) * 1000)
                retry = {"type": "retry", "attempt": attempt, "message": "Rate limit", "next": due}
                self.broadcast("session.status", sessionID=sid, status=retry)
                await asyncio.sleep(outcome.pace)
                self.broadcast("session.status", sessionID=sid, status=busy)
            for i in range(outcome.tokens):
                if outcome.kind == "error" and i == outcome.error_after:
                    break
                part = {"sessionID": sid, "type": "text", "text": f"tok{i}"}
                self.broadcast("message.part.updated", sessionID=sid, part=part)
                await asyncio.sleep(outcome.pace)
            if outcome.kind == "error":
                error = {"name": "APIError", "data": {"message": outcome.error}}
                self.broadcast("session.error", sessionID=sid, error=error)
                self._idle(sid)
                self.broadcast("message.updated", sessionID=sid, info={"error": error})
            elif outcome.kind == "tool" and await self._ask(sid) == "reject":
                pass  # opencode ends the run: idle follows, no error
        except asyncio.CancelledError:
            aborted = {"name": "MessageAbortedError", "data": {"message": "Aborted"}}
            self.broadcast("session.error", sessionID=sid, error=aborted)
            self._idle(sid)  # opencode ends a failed run twice, as below
        finally:
            self.busy.pop(sid, None)
            self._idle(sid)

    async def _ask(self, sid: str) -> str:
        pid = self.new_id("per")
        asked = {"id": pid, "sessionID": sid, "permission": "bash", "patterns": ["ls"]}
        self.permissions[pid] = asked
        waiter = self._replies[pid] = asyncio.get_running_loop().create_future()
        self.broadcast("permission.asked", **asked)
        try:
            reply = await waiter
        finally:
            self.permissions.pop(pid, None)
            self._replies.pop(pid, None)
        self.broadcast("permission.replied", sessionID=sid, requestID=pid, reply=reply)
        if reply != "reject":
            self.broadcast("session.status", sessionID=sid, status={"type": "busy"})
        return str(reply)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.subscribers.append(queue)
        try:
            await response.write(b'data: {"type":"server.connected","properties":{}}\n\n')
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), self.heartbeat)
                except TimeoutError:
                    event = {"type": "server.heartbeat", "properties": {}}
                if event is None:
                    break
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.subscribers.remove(queue)
        return response
