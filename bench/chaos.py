"""A fleet under faults, measured the way Jepsen measures a store.

    python bench/chaos.py --seed 7 --duration 300          # make chaos
    python bench/chaos.py --seed 7 --duration 25 --quick   # the test's run

Three sidecar replicas (processes) share a real ``redis-server`` in front of
one upstream: the fake gptme (``sidecar.demo.fake.FakeGptme``, in this process,
which keeps the upstream's own record of every step) or, with ``--upstream
gptme``, the released gptme-server 0.31.0 (``tests/real/servers.py``, its
fake model behind it). Clients create conversations, post steps and poll,
each request through a replica chosen at random. A nemesis injects, at random
and from the seed, one fault at a time:

======================  ======================================================
kill                    SIGKILL of a replica, restarted after a pause
pause                   SIGSTOP of a replica past its lease, then SIGCONT
term                    SIGTERM of a replica (it must exit within
                        shutdown_grace), restarted
redis-empty             Redis killed and started again with nothing
redis-data              Redis saved, killed and started again with its data
bad-message             a malformed message published on the fleet's channel
bad-record              a malformed record written over a conversation's
======================  ======================================================

The checker holds what every replica served against the upstream's record,
and counts violations of:

(a) **outcome**: a step's outcome (``completed``, or ``failed`` with the
    upstream's error text) is readable through every running replica within
    ``lease_ttl`` + 5 s of the step's end or of the last fault, whichever is
    later (a client posts a conversation's next step only once it has). Two
    exceptions, counted apart. A replica may read ``unknown`` after a
    malformed record overwrote the conversation's (the documented answer:
    dropped, observed afresh) when no replica watching the stream was there
    to rewrite it. And *unseen*: a step that ended while a process
    fault hit the fleet (the replica watching it killed, paused, or Redis
    restarted, during the step or up to lease_ttl + confirm_timeout before
    it) may have ended while no replica watched its stream (one
    stream per conversation), and gptme 0.31.0 does not replay events. The
    sidecar must then say so, the same on every replica: ``failed`` with its
    own "showed no sign of the step", "did not come back" or "no event from
    the upstream within" (the evidence rules; ``start_timeout`` is 4 s here,
    the fake's first event coming within milliseconds), never ``generating``
    forever nor another outcome. A step whose request got no answer (the
    replica killed or frozen with it) but that the upstream ran all the same
    is one of the conversation's steps, checked as one that ended unseen
    (an indeterminate operation, in Jepsen's terms), never skipped;
(b) **monotonic**: a replica process never answers an older state than one it
    answered before. Older is told by ``updated_at``, which the sidecar
    vouches for: every change dates the snapshot no earlier than the one it
    was applied to (``Snapshot.touched``), so along a conversation's history
    it only grows. An earlier ``updated_at``, or the same one with another
    status or error, is a violation (per process: a restarted replica starts
    a new history);
(c) **one stream**: once the faults stop, one upstream stream per
    conversation across the fleet (the fake counts its subscribers) within
    ``lease_ttl`` + 5 s;
(d) **no 5xx** from a replica that is running, and every SIGTERM answered by
    an exit within ``shutdown_grace``.

What the upstream itself fails is counted apart, never as the sidecar's: a
5xx relayed as it came (through ``Via``, and not one of the sidecar's own
errors, which are JSON with ``"source": "sidecar"``); a conversation the
upstream answers with a 5xx on a direct GET when an outcome is due (gptme
0.31.0 writes its ``config.toml`` at every GET, and concurrent GETs can
leave it unreadable for good), retired unjudged; and a step gptme 0.31.0
streamed its workspace race for (``tests/real/servers.WORKSPACE_RACE``)
though its log shows the step's message.

It prints the seed, the command that reproduces the run, and a table; it
exits 1 if any violation was seen. Everything it starts is stopped when it
ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.demo.fake import FakeGptme, Outcome  # noqa: E402

LEASE_TTL = 2.0
GRACE = 5.0
WINDOW = LEASE_TTL + 5.0
FAULTS = ("kill", "pause", "term", "redis-empty", "redis-data", "bad-message", "bad-record")
BAD_MESSAGES = (
    b"rec\nx\nc0\nNaN\n{}",
    b'rec\nevil\nc0\n99\n{"snapshot": {"status": "pwned"}}',
    b"touch\nx\nc0\n-1",
    b"hb\n\x00\r\n",
    b"\xff\xfe garbage",
    b"rec\nx\nc0\n5\n" + b"[" * 1000,
)
BAD_RECORDS: tuple[dict[str, bytes], ...] = (
    {"rev": b"abc", "data": b"{}"},
    {"rev": b"9", "data": b"not json"},
    {"rev": b"9", "data": b'{"snapshot": {"status": "whatever"}}'},
    {"rev": b"9", "data": b'{"snapshot": {"status": "failed", "updated_at": 1e20}}'},
    {"rev": b"9", "data": b'{"snapshot": {"status": "failed", "last_error": {"x": 1}}}'},
    {"rev": b"9", "data": b'{"snapshot": {"status": "idle"}, "last_event_id": "1\\r\\nX: y"}'},
    {"rev": b"9", "data": b'{"snapshot": {"status": "failed", "updated_at": "yesterday"}}'},
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resp(*args: bytes | str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


async def redis_call(port: int, *args: bytes | str) -> bytes:
    """One command on a connection of its own (the nemesis is not a client of the fleet's)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(resp(*args))
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()


# ------------------------------------------------------------ processes


class Redis:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "no", "--dbfilename", "dump.rdb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Replica:
    index: int
    args: list[str]
    log: Path
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    #: Which process this is (a restart is a new one, with a history of its own).
    incarnation: int = 0
    #: False while killed, paused or shutting down: its answers are not judged.
    running: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        argv = [
            sys.executable, "-m", "sidecar", *self.args, "--port", str(self.port),
            "--admin-port", str(self.admin_port),
        ]  # fmt: skip
        self.proc = await asyncio.to_thread(self._spawn, argv)
        self.incarnation += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.index} exited at start: see {self.log}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(
                    f"http://127.0.0.1:{self.admin_port}/healthz",
                    timeout=aiohttp.ClientTimeout(total=2),
                ) as r:
                    if r.status == 200:
                        self.running = True
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"replica {self.index} did not start: see {self.log}")

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
        return self.proc.returncode if self.proc is not None else 0

    def kill(self) -> None:
        self.running = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)


# -------------------------------------------------------------- upstreams


class FakeUpstream:
    """The fake gptme in this process: it knows every step's outcome."""

    name = "fake gptme 0.31.0"

    def __init__(self) -> None:
        self.fake = FakeGptme("0.31.0", heartbeat=1.0)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self.runner = web.AppRunner(self.fake.app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def fails(self, cid: str) -> bool:
        return False  # the fake never fails a GET

    def failed_itself(self, error: str | None) -> bool:
        return False  # the fake's record is every step's outcome

    def plan(self, cid: str, rng: random.Random, n: int) -> tuple[str, str | None]:
        if rng.random() < 0.3:
            error = f"step {n} of {cid} failed upstream (seeded error {rng.randrange(10**6)})"
            self.fake.planned[cid] = Outcome(
                kind="error", tokens=rng.randint(1, 5), error=error, error_after=rng.randint(0, 2)
            )
            return "failed", error
        self.fake.planned[cid] = Outcome(tokens=rng.randint(3, 30), pace=rng.uniform(0.005, 0.03))
        return "completed", None

    def ended(self, cid: str, seen: int) -> tuple[str, str | None] | None:
        """The outcome of the conversation's step number ``seen`` (0-based), once it ended."""
        mine = [(o, e) for c, o, e in self.fake.ledger if c == cid]
        return mine[seen] if len(mine) > seen else None

    def streams(self, cid: str) -> int:
        return self.fake.subscriber_count(cid)


class GptmeUpstream:
    """The released gptme-server 0.31.0 and its fake model (tests/real/servers.py).

    Its record of a step is its own conversation log: a step ended when an
    assistant message was added (its fake model answers every step). It
    cannot count streams: check (c) is the fake's alone."""

    name = "gptme-server 0.31.0 (released)"

    def __init__(self) -> None:
        from tests.real import servers

        self.servers = servers
        self.model: Any = None
        self.server: Any = None
        self.url = ""
        self.base: dict[str, int] = {}
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.model = await asyncio.to_thread(self.servers.start_model)
        self.server = await asyncio.to_thread(self.servers.start_gptme, "0.31.0", self.model.url)
        self.url = self.server.url
        self.http = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        for proc in (self.server, self.model):
            if proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(proc.stop)

    def body(self, cid: str) -> dict[str, Any]:
        return self.servers.gptme_conversation(cid, "ok")

    def plan(self, cid: str, rng: random.Random, n: int) -> tuple[str, str | None]:
        return "completed", None

    async def assistant_messages(self, cid: str) -> int:
        assert self.http is not None
        async with self.http.get(f"{self.url}/api/v2/conversations/{cid}") as r:
            if r.status != 200:
                return -1
            log = (await r.json()).get("log", [])
        return sum(1 for m in log if m.get("role") == "assistant")

    async def ended_async(self, cid: str, seen: int) -> tuple[str, str | None] | None:
        count = await self.assistant_messages(cid)
        return ("completed", None) if count - self.base.get(cid, 0) > seen else None

    def streams(self, cid: str) -> int:
        return -1

    def failed_itself(self, error: str | None) -> bool:
        """Whether ``error`` is one gptme 0.31.0 streams for a step whose
        message its log keeps: its race on the conversation's workspace
        symlink, raised while it announces the message (the conformance
        suite's ``WORKSPACE_RACE``). Its log alone would call it completed."""
        return error is not None and re.search(self.servers.WORKSPACE_RACE, error) is not None

    async def fails(self, cid: str) -> bool:
        """Whether gptme itself answers a direct GET of ``cid`` with a 5xx
        (0.31.0 writes the conversation's config.toml at every GET, and
        concurrent GETs can leave it unreadable: every later GET then fails,
        "ChatConfig has no logdir set" in its log)."""
        assert self.http is not None
        for _ in range(3):
            async with self.http.get(f"{self.url}/api/v2/conversations/{cid}") as r:
                await r.read()
                if r.status < 500:
                    return False
            await asyncio.sleep(0.5)
        return True


# ---------------------------------------------------------------- chaos


@dataclass
class Stats:
    faults: Counter[str] = field(default_factory=Counter)
    steps: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    refused: int = 0  # connection errors from a replica that was down
    violations: Counter[str] = field(default_factory=Counter)
    #: Steps that ended during a process fault, reported unseen by the evidence rule.
    unseen: int = 0
    #: Steps whose request got no answer (a fault) yet that the upstream ran.
    indeterminate: int = 0
    #: Reads of ``unknown`` after a bad record destroyed what the fleet knew.
    forgotten: int = 0
    #: 5xx answers that were the upstream's own, relayed as they came (the
    #: sidecar's own errors are JSON with ``"source": "sidecar"``).
    upstream_5xx: int = 0
    #: Conversations the upstream itself broke (its own 5xx to a direct GET
    #: when an outcome was due): no longer stepped nor judged.
    broken: set[str] = field(default_factory=set)
    #: Steps gptme's log shows done but that gptme streamed an error for.
    upstream_failed: int = 0
    details: list[str] = field(default_factory=list)
    exit_times: list[float] = field(default_factory=list)

    def violate(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if self.violations[kind] <= 5:
            self.details.append(f"{kind}: {detail}")


class Chaos:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = tmp
        self.stats = Stats()
        self.redis = Redis(tmp)
        self.upstream: FakeUpstream | GptmeUpstream = (
            GptmeUpstream() if args.upstream == "gptme" else FakeUpstream()
        )
        self.replicas: list[Replica] = []
        self.cids = [f"c{i}" for i in range(args.conversations)]
        self.sessions: dict[str, str] = {}
        self.last_fault_end = time.monotonic()
        self.faulting = False
        self.faulting_process = False
        self.process_fault_end = 0.0
        #: When each conversation's record was last overwritten with garbage.
        self.forgotten: dict[str, float] = {}
        self.stopping = False
        #: (replica, incarnation, conversation) -> (updated_at, status, last_error) last served
        self.served: dict[tuple[int, int, str], tuple[str, str, Any]] = {}
        self.http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ setup
    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        self.redis.start()
        await self.upstream.start()
        # The fake's first event comes within milliseconds of a step: a step
        # with no event for 4 s is one whose events no replica saw.
        extra = ["--store-timeout", "0.5", "--confirm-timeout", "3", "--start-timeout", "4"]
        for i in range(3):
            args = [
                "--upstream", self.upstream.url, "--store", self.redis.url,
                "--store-prefix", "chaos:", "--lease-ttl", str(LEASE_TTL),
                "--shutdown-grace", str(GRACE), "--log-level", "info", *extra,
            ]  # fmt: skip
            replica = Replica(i, args, self.tmp / f"replica-{i}.log")
            await replica.start(self.http)
            self.replicas.append(replica)
        for cid in self.cids:
            await self.create(cid)

    async def stop(self) -> None:
        for replica in self.replicas:
            replica.kill()
        self.redis.kill()
        with contextlib.suppress(Exception):
            await self.upstream.stop()
        if self.http is not None:
            await self.http.close()

    def pick(self) -> Replica:
        return self.rng.choice(self.replicas)

    def note(self, what: str) -> None:
        """A line of the nemesis's log (UTC, as the replicas' logs are)."""
        stamp = time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"
        with open(self.tmp / "nemesis.log", "a") as out:
            out.write(f"{stamp} {what}\n")

    async def create(self, cid: str) -> None:
        assert self.http is not None
        body = (
            self.upstream.body(cid)
            if isinstance(self.upstream, GptmeUpstream)
            else {"prompt": "p", "messages": [{"role": "user", "content": "hello"}]}
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            replica = self.pick()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.put(
                    f"{replica.url}/api/v2/conversations/{cid}", json=body
                ) as r:
                    if r.status == 200:
                        self.sessions[cid] = str((await r.json())["session_id"])
                        if isinstance(self.upstream, GptmeUpstream):
                            self.upstream.base[cid] = await self.upstream.assistant_messages(cid)
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"could not create {cid}")

    # ---------------------------------------------------------- reading
    async def read(self, replica: Replica, cid: str) -> dict[str, Any] | None:
        """One GET through ``replica``, judged (b, d); the session object or None."""
        assert self.http is not None
        incarnation, was_running = replica.incarnation, replica.running
        try:
            async with self.http.get(
                f"{replica.url}/api/v2/conversations/{cid}",
                timeout=aiohttp.ClientTimeout(total=10),
            ) as r:
                status = r.status
                body = await r.json() if status == 200 else await r.text()
                relayed = status >= 500 and _relayed(r.headers, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.stats.refused += 1
            if was_running and replica.running and not self.faulting and not self.stopping:
                # (A replica shutting down or killed in between is not judged.)
                self.stats.violate("d", f"replica {replica.index} failed a GET: {exc!r}")
            return None
        self.stats.reads += 1
        if relayed:
            self.stats.upstream_5xx += 1  # the upstream's own answer, relayed as it came
            return None
        if status >= 500:
            if was_running and replica.running:
                self.stats.violate("d", f"replica {replica.index} answered {status}: {body!r:.200}")
            return None
        if status != 200 or not isinstance(body, dict) or "session" not in body:
            return None
        session = body["session"]
        if replica.incarnation == incarnation and session.get("updated_at") is not None:
            key = (replica.index, incarnation, cid)
            now = (session["updated_at"], session["status"], session["last_error"])
            before = self.served.get(key)
            if before is not None and (
                now[0] < before[0] or (now[0] == before[0] and now[1:] != before[1:])
            ):
                self.stats.violate(
                    "b", f"replica {replica.index} served {now} for {cid} after {before}"
                )
            if before is None or now[0] >= before[0]:
                self.served[key] = now
        return dict(session)

    # ---------------------------------------------------------- clients
    async def client(self, cid: str, until: float) -> None:
        """Steps and polls on one conversation; every outcome checked (a)."""
        assert self.http is not None
        step = 0
        while time.monotonic() < until and cid not in self.stats.broken:
            for _ in range(self.rng.randint(1, 4)):
                await self.read(self.pick(), cid)
                await asyncio.sleep(self.rng.uniform(0.01, 0.1))
            self.upstream.plan(cid, self.rng, step)
            replica = self.pick()
            try:
                async with self.http.post(
                    f"{replica.url}/api/v2/conversations/{cid}/step",
                    json={"session_id": self.sessions[cid]},
                ) as r:
                    accepted = r.status == 200
                    text = await r.text()
                    if r.status >= 500 and _relayed(r.headers, text):
                        self.stats.upstream_5xx += 1
                    elif r.status >= 500 and replica.running:
                        self.stats.violate(
                            "d", f"replica {replica.index} answered a step {r.status}"
                        )
            except (aiohttp.ClientError, TimeoutError):
                accepted = False
            accepted_at = time.monotonic()
            if not accepted:
                # Indeterminate (the replica died or froze with the request):
                # the upstream may have run the step all the same. Then it is
                # one of the conversation's steps, checked as one that ended
                # during a fault; else it is asked for again.
                if not await self.ran_anyway(cid, step):
                    await asyncio.sleep(0.2)
                    continue
                self.stats.indeterminate += 1
                self.note(f"{cid} step {step} not answered, run upstream all the same")
            else:
                self.note(f"{cid} step {step} accepted by replica {replica.index}")
            outcome = await self.ended(cid, step)
            self.note(f"{cid} step {step} ended {outcome}")
            if outcome is None:
                if not await self.broken_upstream(cid):
                    self.stats.violate("a", f"{cid} step {step}: the upstream never ended it")
                return
            self.stats.steps[outcome[0]] += 1
            await self.verify(cid, step, outcome, accepted_at, hit=not accepted)
            step += 1

    async def ran_anyway(self, cid: str, step: int) -> bool:
        """Whether a step whose request got no answer reached the upstream."""
        if isinstance(self.upstream, FakeUpstream):
            # The fake takes a step's planned outcome as it starts it.
            return self.upstream.fake.planned.pop(cid, None) is None
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if await self.upstream.ended_async(cid, step) is not None:
                return True
            await asyncio.sleep(0.1)
        return False

    async def ended(self, cid: str, step: int) -> tuple[str, str | None] | None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if isinstance(self.upstream, GptmeUpstream):
                found = await self.upstream.ended_async(cid, step)
            else:
                found = self.upstream.ended(cid, step)
            if found is not None:
                return found
            await asyncio.sleep(0.05)
        return None

    async def broken_upstream(self, cid: str) -> bool:
        """Whether the upstream itself fails ``cid`` (its own 5xx to a direct
        GET): then no replica can show it, and it is retired, counted apart."""
        if not await self.upstream.fails(cid):
            return False
        self.stats.broken.add(cid)
        self.note(f"{cid} broken by the upstream (its own 5xx to a direct GET): retired")
        return True

    async def verify(
        self,
        cid: str,
        step: int,
        outcome: tuple[str, str | None],
        accepted_at: float,
        hit: bool = False,
    ) -> None:
        """(a): the outcome, through every replica, in time."""
        ended_at = time.monotonic()
        # A process fault between the step's acceptance and its end: it may
        # have ended unseen (see the module's text).
        # (A fault that ended just before still acts for a while: the lease it
        # lapsed is taken over up to lease_ttl later, and the new holder's
        # confirm_timeout runs after that.)
        hit = (
            hit or self.faulting_process or self.process_fault_end >= accepted_at - (LEASE_TTL + 3)
        )
        unseen = upstream_failed = False
        waiting = set(range(len(self.replicas)))
        while waiting:
            deadline = max(ended_at, self.last_fault_end) + WINDOW
            for index in sorted(waiting):
                replica = self.replicas[index]
                if not replica.running:
                    continue
                session = await self.read(replica, cid)
                if session is None:
                    continue
                got = (session["status"], session["last_error"])
                if got == outcome or (outcome[1] is None and got[0] == outcome[0]):
                    waiting.discard(index)
                elif got[0] == "failed" and self.upstream.failed_itself(got[1]):
                    # gptme streamed an error for the step (the sidecar cannot
                    # make that text up), though its log shows the message.
                    waiting.discard(index)
                    upstream_failed = True
                elif hit and got[0] == "failed" and _unseen(got[1]):
                    waiting.discard(index)
                    unseen = True
                elif got[0] == "unknown" and self.forgotten.get(cid, 0.0) >= accepted_at:
                    # Its record was destroyed (bad-record) and no replica
                    # watching it could vouch for it: unknown, as documented.
                    waiting.discard(index)
                    self.stats.forgotten += 1
            if not waiting:
                self.stats.unseen += unseen
                self.stats.upstream_failed += upstream_failed
                return
            if time.monotonic() > deadline and not self.faulting:
                if await self.broken_upstream(cid):
                    return
                now = {
                    i: ((s or {}).get("status"), str((s or {}).get("last_error"))[:70])
                    for i in waiting
                    for s in [await self.read(self.replicas[i], cid)]
                }
                self.stats.violate(
                    "a", f"{cid} step {step} ended {outcome}; replicas {sorted(waiting)} "
                    f"still read {now} {WINDOW:g} s after it and the last fault",
                )  # fmt: skip
                return
            await asyncio.sleep(0.05)

    # ----------------------------------------------------------- nemesis
    async def nemesis(self, until: float) -> None:
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.uniform(0.1, 0.6))
            if time.monotonic() >= until:
                break
            kind = self.rng.choice(self.args.faults)
            process = kind not in ("bad-message", "bad-record")
            self.faulting = True
            self.faulting_process = process
            self.note(f"{kind} begins")
            try:
                await getattr(self, "fault_" + kind.replace("-", "_"))()
            finally:
                self.faulting = self.faulting_process = False
                self.last_fault_end = time.monotonic()
                if process:
                    self.process_fault_end = self.last_fault_end
            self.stats.faults[kind] += 1

    async def fault_kill(self) -> None:
        replica = self.pick()
        self.note(f"  replica {replica.index}")
        replica.kill()
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        assert self.http is not None
        await replica.start(self.http)

    async def fault_pause(self) -> None:
        replica = self.pick()
        self.note(f"  replica {replica.index}")
        replica.running = False
        replica.signal(signal.SIGSTOP)
        await asyncio.sleep(LEASE_TTL + self.rng.uniform(0.3, 1.2))
        replica.signal(signal.SIGCONT)
        replica.running = True

    async def fault_term(self) -> None:
        replica = self.pick()
        self.note(f"  replica {replica.index}")
        replica.running = False
        started = time.monotonic()
        replica.signal(signal.SIGTERM)
        code = await replica.wait(GRACE + 5)
        took = time.monotonic() - started
        self.stats.exit_times.append(took)
        if code is None or took > GRACE:
            self.stats.violate(
                "d", f"replica {replica.index} took {took:.1f} s to exit (code {code})"
            )
        replica.kill()
        assert self.http is not None
        await replica.start(self.http)

    async def fault_redis_empty(self) -> None:
        self.redis.kill()
        (self.tmp / "dump.rdb").unlink(missing_ok=True)
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        await asyncio.to_thread(self.redis.start)

    async def fault_redis_data(self) -> None:
        await redis_call(self.redis.port, "SAVE")
        self.redis.kill()
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        await asyncio.to_thread(self.redis.start)

    async def fault_bad_message(self) -> None:
        message = self.rng.choice(BAD_MESSAGES).replace(b"c0", self.rng.choice(self.cids).encode())
        await redis_call(self.redis.port, "PUBLISH", "chaos:changes", message)

    async def fault_bad_record(self) -> None:
        fields = self.rng.choice(BAD_RECORDS)
        cid = self.rng.choice(self.cids)
        self.note(f"  {cid}: {fields}")
        self.forgotten[cid] = time.monotonic()
        args: list[bytes | str] = ["HSET", f"chaos:rec:{cid}"]
        for name, value in fields.items():
            args += [name, value]
        await redis_call(self.redis.port, *args)

    # ------------------------------------------------------------- run
    async def run(self) -> None:
        until = time.monotonic() + self.args.duration
        clients = [asyncio.create_task(self.client(cid, until)) for cid in self.cids]
        await self.nemesis(until)
        self.last_fault_end = time.monotonic()
        await asyncio.gather(*clients)
        await self.steady()
        await self.shutdown()

    async def steady(self) -> None:
        """(c): one stream per conversation, once the faults stopped."""
        if isinstance(self.upstream, GptmeUpstream):
            return
        deadline = time.monotonic() + WINDOW
        while True:
            for replica in self.replicas:  # every replica has read every conversation
                for cid in self.cids:
                    await self.read(replica, cid)
            counts = {cid: self.upstream.streams(cid) for cid in self.cids}
            if all(n == 1 for n in counts.values()):
                return
            if time.monotonic() > deadline:
                self.stats.violate("c", f"streams per conversation {WINDOW:g} s after: {counts}")
                return
            await asyncio.sleep(0.2)

    async def shutdown(self) -> None:
        """(d): every replica exits within shutdown_grace of SIGTERM."""
        self.stopping = True
        started = time.monotonic()
        for replica in self.replicas:
            replica.running = False
            replica.signal(signal.SIGTERM)
        for replica in self.replicas:
            code = await replica.wait(GRACE + 5)
            took = time.monotonic() - started
            self.stats.exit_times.append(took)
            if code is None or took > GRACE or code != 0:
                self.stats.violate(
                    "d", f"replica {replica.index} at the end: exit {code} after {took:.1f} s"
                )


def _relayed(headers: Any, body: object) -> bool:
    """Whether a 5xx is the upstream's own answer relayed by the replica: it
    came through the sidecar (``Via``) and is not one of the sidecar's own
    errors (JSON with ``"source": "sidecar"``)."""
    if "sidecar" not in ",".join(headers.getall("Via", ())):
        return False
    try:
        parsed = json.loads(body) if isinstance(body, str) else body
    except ValueError:
        return True
    return not (isinstance(parsed, dict) and parsed.get("source") == "sidecar")


def _unseen(error: str | None) -> bool:
    """The sidecar's own words for a step whose end no stream showed."""
    return error is not None and (
        "showed no sign of the step" in error
        or "did not come back" in error
        or "no event from the upstream within" in error
    )


def report(chaos: Chaos, command: str, elapsed: float) -> int:
    stats = chaos.stats
    total = sum(stats.faults.values())
    print(f"seed {chaos.args.seed}: {command}")
    print(
        f"upstream: {chaos.upstream.name}; 3 replicas, lease_ttl {LEASE_TTL:g} s, "
        f"shutdown_grace {GRACE:g} s; {elapsed:.0f} s\n"
    )
    print(f"{'faults':<14} | {'count':>6}")
    print("-" * 23)
    for kind in chaos.args.faults:
        print(f"{kind:<14} | {stats.faults[kind]:>6}")
    print(f"{'total':<14} | {total:>6}\n")
    print(f"steps: {sum(stats.steps.values())} ({stats.steps['completed']} completed, "
          f"{stats.steps['failed']} failed; {stats.unseen} ended unseen during a fault, "
          f"reported so; {stats.indeterminate} not answered but run upstream); "
          f"reads: {stats.reads} ({stats.forgotten} unknown after a bad record, as documented) "
          f"(+{stats.refused} refused by replicas that were down)")  # fmt: skip
    if stats.upstream_failed:
        print(f"steps gptme's log shows done but gptme streamed an error for (its workspace "
              f"race), read so: {stats.upstream_failed}")  # fmt: skip
    if stats.upstream_5xx or stats.broken:
        print(f"the upstream's own 5xx answers, relayed: {stats.upstream_5xx}; conversations "
              f"it broke itself (its own 5xx to a direct GET), retired unjudged: "
              f"{len(stats.broken)} {sorted(stats.broken)}")  # fmt: skip
    slowest = max(stats.exit_times, default=0.0)
    print(f"SIGTERM to exit: {len(stats.exit_times)} exits, slowest {slowest:.2f} s\n")
    names = {
        "a": "(a) outcome readable on every replica in time",
        "b": "(b) never an older state from a replica",
        "c": "(c) one upstream stream per conversation",
        "d": "(d) no 5xx from a running replica, exit within grace",
    }
    print(f"{'violations':<54} | {'count':>6}")
    print("-" * 63)
    for key, name in names.items():
        print(f"{name:<54} | {stats.violations[key]:>6}")
    for line in stats.details:
        print("  " + line)
    bad = sum(stats.violations.values())
    print(f"\nviolations: {bad}" + (f" (reproduce: {command})" if bad else ""))
    return 1 if bad else 0


async def main_async(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-chaos-"))
    chaos = Chaos(args, tmp)
    command = (
        f"python bench/chaos.py --seed {args.seed} --duration {args.duration:g} "
        f"--upstream {args.upstream} --conversations {args.conversations}"
        + (f" --faults {','.join(args.faults)}" if tuple(args.faults) != FAULTS else "")
    )
    started = time.monotonic()
    # SIGTERM ends the run as Ctrl-C does: everything it started is stopped.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await chaos.start()
        await chaos.run()
    finally:
        await chaos.stop()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = report(chaos, command, time.monotonic() - started)
    print(printed.getvalue(), end="")
    if code and not args.keep:
        # The report beside the logs: a run inside the test suite, whose
        # output pytest keeps to itself, can still be read afterwards.
        (tmp / "report.txt").write_text(printed.getvalue())
        print(f"replica logs and this report kept in {tmp}")
    elif not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of faults")
    parser.add_argument("--upstream", choices=("fake", "gptme"), default="fake")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument(
        "--faults",
        type=lambda v: tuple(v.split(",")),
        default=FAULTS,
        help="comma-separated kinds (default: all)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the replicas' logs")
    args = parser.parse_args()
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    if os.environ.get("SIDECAR_CHAOS_DEBUG"):
        print(f"working directory kept: {args}")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
