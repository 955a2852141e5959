"""The outbox: transitions waiting to be delivered, one queue per receiver, in order.

A transition becomes an :class:`Entry` (its ``webhook-id``, made once, and
the exact body sent), put in the queue of each receiver that asked for its
status, and leaves the queue only when it was delivered or given up
(``done``). So delivery is at least once: a process that dies between the
POST and ``done`` sends it again, with the same id.

Three kinds, chosen with the store (``sidecar.app``):

* :class:`MemoryOutbox` (``store = "memory"``): nothing outlives the process;
* :class:`SqliteOutbox` (the default ``sqlite`` store): the same file as the
  snapshots, a table of its own, written by a thread of its own at once
  (no coalescing pause): a SIGKILL loses no entry that was put more than a
  moment before, and the queue is read back at start;
* ``sidecar.webhooks.redis_outbox.RedisOutbox``: a fleet's, in Redis.

Each queue is bounded (``webhook_outbox_max``): a full one refuses the new
entry, which is counted and said in the log once a minute per receiver.
What is read back (from the file, from Redis) is never trusted: an entry
that is too large, not JSON, or of the wrong types is dropped and counted
(``invalid``), never delivered half-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import sqlite3
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..core.snapshot import STATUSES

__all__ = ["MAX_ENTRY", "Entry", "MemoryOutbox", "Outbox", "SqliteOutbox"]

log = logging.getLogger("sidecar.webhooks")

#: An entry larger than this (the snapshot's pending tools are the upstream's)
#: is not kept: it is counted as refused, and said.
MAX_ENTRY = 8 * 1024 * 1024
_ID = re.compile(r"msg_[0-9A-Za-z]{16,64}")
FULL_SAID_EVERY = 60.0


@dataclass(frozen=True)
class Entry:
    """One transition, as every receiver that wants it gets it."""

    id: str
    conversation: str
    status: str
    #: When the transition was seen (seconds since the epoch): ages count from here.
    created: float
    #: The JSON body, exactly as sent (the signature covers these bytes).
    body: bytes

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "v": 1,
                "id": self.id,
                "conversation": self.conversation,
                "status": self.status,
                "created": self.created,
                "body": self.body.decode(),
            }
        )

    @classmethod
    def loads(cls, raw: Any) -> Entry:
        """An entry read back from a store; ``ValueError`` if it is not one."""
        if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) > MAX_ENTRY:
            raise ValueError("not bytes, or larger than an entry can be")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("v") != 1:
            raise ValueError("not an entry of this version")
        msg_id, conversation = doc.get("id"), doc.get("conversation")
        status, created, body = doc.get("status"), doc.get("created"), doc.get("body")
        if not isinstance(msg_id, str) or not _ID.fullmatch(msg_id):
            raise ValueError("no webhook id")
        if not isinstance(conversation, str) or not 0 < len(conversation) <= 4096:
            raise ValueError("no conversation id")
        if status not in STATUSES:
            raise ValueError("no known status")
        if (
            isinstance(created, bool)
            or not isinstance(created, int | float)
            or not math.isfinite(created)
        ):
            raise ValueError("no time")
        if not isinstance(body, str):
            raise ValueError("no body")
        encoded = body.encode()
        try:
            if not isinstance(orjson.loads(encoded), dict):
                raise ValueError("the body is not a JSON object")
        except orjson.JSONDecodeError:
            raise ValueError("the body is not JSON") from None
        return cls(msg_id, conversation, status, float(created), encoded)


class Outbox:
    """The interface, and what every kind shares: the counts and the wake-ups.

    ``put`` never waits (the request path and the event loop call it);
    ``head`` is the next entry this process may deliver for a receiver now
    (None: none, or another replica delivers them); ``done`` takes it out.
    """

    kind = "memory"
    #: Why the outbox cannot keep entries beyond this process (None: it can).
    degraded: str | None = None

    def __init__(self, receivers: list[str], limit: int) -> None:
        self.limit = limit
        self.receivers = list(receivers)
        #: Entries dropped unread (invalid) or refused (full), by (receiver, result).
        self.dropped: Counter[tuple[str, str]] = Counter()
        self._wakes: dict[str, asyncio.Event] = {}
        self._full_said: dict[str, float] = {}

    # -------------------------------------------------------------- verbs
    def put(self, receiver: str, entry: Entry) -> bool:
        raise NotImplementedError

    async def head(self, receiver: str) -> Entry | None:
        raise NotImplementedError

    async def done(self, receiver: str, entry: Entry) -> None:
        raise NotImplementedError

    def pending(self, receiver: str) -> list[Entry]:
        """What waits for this receiver, as far as this process knows, oldest first."""
        raise NotImplementedError

    def count(self, receiver: str) -> int:
        return len(self.pending(receiver))

    def delivers(self, receiver: str) -> bool:
        """This process delivers the receiver's queue (a fleet's: one replica does)."""
        return True

    def oldest(self, receiver: str) -> float | None:
        """When the oldest waiting entry's transition was seen (None: none waits)."""
        return min((e.created for e in self.pending(receiver)), default=None)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # ----------------------------------------------------------- wake-ups
    def wake(self, receiver: str) -> None:
        event = self._wakes.get(receiver)
        if event is not None:
            event.set()

    async def wait(self, receiver: str, timeout: float) -> None:
        """Until something is put for this receiver here, or ``timeout``."""
        event = self._wakes.setdefault(receiver, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        event.clear()

    # ------------------------------------------------------------ refusals
    def refused(self, receiver: str, why: str = "full") -> None:
        """An entry not kept: counted, and said once a minute per receiver."""
        self.dropped[(receiver, "refused")] += 1
        now = time.monotonic()
        if now - self._full_said.get(receiver, -FULL_SAID_EVERY) >= FULL_SAID_EVERY:
            self._full_said[receiver] = now
            log.warning(
                "webhook outbox full: transitions are being dropped"
                if why == "full"
                else "webhook dropped: its body is larger than an entry can be",
                extra={
                    "receiver": receiver,
                    "limit": self.limit,
                    "why": "the receiver is down or too slow for webhook_max_age; raise "
                    "webhook_outbox_max or fix the receiver"
                    if why == "full"
                    else f"larger than {MAX_ENTRY} bytes",
                    "next_said_in_s": FULL_SAID_EVERY,
                },
            )

    def invalid(self, receiver: str, why: str) -> None:
        self.dropped[(receiver, "invalid")] += 1
        log.warning(
            "webhook outbox entry unreadable: dropped", extra={"receiver": receiver, "reason": why}
        )


class MemoryOutbox(Outbox):
    """Queues in memory (``store = "memory"``): lost with the process."""

    def __init__(self, receivers: list[str], limit: int) -> None:
        super().__init__(receivers, limit)
        self._queues: dict[str, deque[Entry]] = {r: deque() for r in receivers}

    def put(self, receiver: str, entry: Entry) -> bool:
        queue = self._queues[receiver]
        if len(queue) >= self.limit:
            self.refused(receiver)
            return False
        queue.append(entry)
        self._kept(receiver, entry)
        self.wake(receiver)
        return True

    def _kept(self, receiver: str, entry: Entry) -> None:
        """Hook: the entry is in the queue (a file keeps it too)."""

    async def head(self, receiver: str) -> Entry | None:
        queue = self._queues[receiver]
        return queue[0] if queue else None

    async def done(self, receiver: str, entry: Entry) -> None:
        queue = self._queues[receiver]
        if queue and queue[0] is entry:
            queue.popleft()
        else:
            with contextlib.suppress(ValueError):
                queue.remove(entry)
        self._gone(receiver, entry)

    def _gone(self, receiver: str, entry: Entry) -> None:
        """Hook: the entry left the queue."""

    def pending(self, receiver: str) -> list[Entry]:
        return list(self._queues[receiver])

    def count(self, receiver: str) -> int:
        return len(self._queues[receiver])

    def oldest(self, receiver: str) -> float | None:
        queue = self._queues[receiver]
        return queue[0].created if queue else None


class SqliteOutbox(MemoryOutbox):
    """The queues in memory, mirrored in the store's SQLite file by a writer thread.

    The file is the snapshots' own (``sidecar.state.store``), which the store
    has locked for this process; the outbox has a table and a connection of
    its own. Writes are queued and written by the thread at once, in order,
    one transaction per batch: the event loop never waits on the disk. A
    file that cannot be used leaves the outbox in memory, degraded, and says so.
    """

    kind = "sqlite"

    def __init__(self, path: Path, receivers: list[str], limit: int) -> None:
        super().__init__(receivers, limit)
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._seq = 0
        self._seqs: dict[int, int] = {}  # id(entry) -> its row
        self._ops: list[tuple[str, int, str, bytes]] = []  # ("put"/"done", row, receiver, blob)
        self._guard = threading.Lock()
        self._wake_writer = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.writes = 0

    def open(self) -> None:
        """Open the table and read back what waits; degrade to memory if it cannot."""
        try:
            db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=5
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS webhook_outbox"
                " (seq INTEGER PRIMARY KEY, receiver TEXT NOT NULL, entry BLOB NOT NULL)"
            )
            rows = db.execute(
                "SELECT seq, receiver, entry FROM webhook_outbox ORDER BY seq"
            ).fetchall()
        except sqlite3.Error as exc:
            self._degrade(f"cannot use {self.path}: {exc}")
            return
        self._db = db
        orphans: Counter[str] = Counter()
        for seq, receiver, blob in rows:
            self._seq = max(self._seq, int(seq))
            if receiver not in self._queues:
                orphans[str(receiver)] += 1  # a receiver no longer configured
                continue
            try:
                entry = Entry.loads(blob)
            except ValueError as exc:
                self.invalid(str(receiver), str(exc))
                self._ops.append(("done", int(seq), str(receiver), b""))
                continue
            if len(self._queues[receiver]) >= self.limit:
                self.refused(receiver)
                self._ops.append(("done", int(seq), str(receiver), b""))
                continue
            self._queues[receiver].append(entry)
            self._seqs[id(entry)] = int(seq)
        if orphans:
            log.warning(
                "webhook outbox holds deliveries for receivers no longer configured: kept, "
                "not sent (configure them again to send them)",
                extra={"receivers": dict(orphans)},
            )
        kept = sum(len(q) for q in self._queues.values())
        if kept:
            log.info("webhook deliveries restored", extra={"count": kept, "store": "sqlite"})
        self._thread = threading.Thread(target=self._write_loop, name="sidecar-outbox", daemon=True)
        self._thread.start()
        if self._ops:
            self._wake_writer.set()

    def _degrade(self, why: str) -> None:
        self.degraded = why
        log.warning(
            "webhook outbox degraded: deliveries kept in memory only", extra={"reason": why}
        )

    def _kept(self, receiver: str, entry: Entry) -> None:
        if self._db is None:
            return
        self._seq += 1
        self._seqs[id(entry)] = self._seq
        with self._guard:
            self._ops.append(("put", self._seq, receiver, entry.dumps()))
        self._wake_writer.set()

    def _gone(self, receiver: str, entry: Entry) -> None:
        seq = self._seqs.pop(id(entry), None)
        if seq is None or self._db is None:
            return
        with self._guard:
            self._ops.append(("done", seq, receiver, b""))
        self._wake_writer.set()

    async def close(self) -> None:
        """Write what is queued, then close."""
        self._stop = True
        self._wake_writer.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _write_loop(self) -> None:
        while True:
            self._wake_writer.wait()
            self._wake_writer.clear()
            self._flush()
            if self._stop:
                self._flush()
                return

    def _flush(self) -> None:
        with self._guard:
            ops, self._ops = self._ops, []
        if not ops or self._db is None:
            return
        # An entry delivered before it was written needs no row at all.
        gone = {seq for op, seq, _, _ in ops if op == "done"}
        puts = [(seq, r, blob) for op, seq, r, blob in ops if op == "put" and seq not in gone]
        written = {seq for op, seq, _, _ in ops if op == "put"}
        deletes = [(seq,) for seq in gone if seq not in written]
        try:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO webhook_outbox VALUES (?, ?, ?)", puts)
            self._db.executemany("DELETE FROM webhook_outbox WHERE seq = ?", deletes)
            self._db.execute("COMMIT")
            self.writes += len(puts)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if self.degraded is None:
                self._degrade(f"cannot write {self.path}: {exc}")
