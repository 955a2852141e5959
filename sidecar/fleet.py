"""Several replicas, one truth: the shared store in Redis (``store = "redis://…"``).

Every replica (a process, a pod) keeps its snapshots in memory as before and
reads them there; Redis holds the shared copy and decides who does what:

* **One stream per conversation across the fleet.** A replica opens a
  conversation's upstream stream only while it holds its *lease*
  (``{prefix}lease:{key}``, set if absent with an expiry of ``lease_ttl``,
  renewed every third of it, deleted on close). Each lease carries a fencing
  token (a counter in Redis); every write the holder makes from its stream
  is checked against it in the same Lua script, so a replica that lost its
  lease (paused, partitioned) cannot overwrite newer state.
* **Writes are compare-and-set on a revision.** A change is a pure function
  of the snapshot (the reducer's); a replica applies it to its copy at once,
  then writes ``f(shared)`` only if the shared revision is the one it read.
  If another replica wrote first, the change is applied again to the newer
  snapshot and written again. So a trigger accepted on any replica sets
  ``starting`` atomically, with the reducer's own rule: a late answer never
  overwrites an event that overtook it. The trigger's answer waits for the
  write (up to ``store_timeout``): the next GET on any replica sees it.
* **Reads:** an enrich GET fetches the shared snapshot while the upstream
  answers (one round trip, overlapped), and pub/sub (``{prefix}changes``)
  pushes every write to every replica: held long-polls wake on any of them.
  A replica whose heartbeat stops is no longer believed: a stream it says is
  ``live`` reads ``reconnecting`` until another takes the lease over.
* **Failover:** conversations with work in flight or waiting for a human are
  listed in ``{prefix}watch``; every replica looks for listed ones whose lease
  lapsed, and takes them over (from a SIGKILL: within ``lease_ttl``), as a
  restarted sidecar does: ``Last-Event-ID`` where the upstream has ids, and
  work in flight must show an event within ``confirm_timeout`` of the new
  stream being live.
* **Redis down or slow never stops the proxy.** Every call is bounded by
  ``store_timeout``; on a failure the replica marks the store degraded
  (``/readyz`` stays 200 and says so, as does ``sidecar_store_degraded``),
  opens its own streams for what it serves, and goes on in memory. When Redis
  answers again it takes the leases it can, writes what it saw meanwhile, and
  hands the rest back to their holders.

A client's credentials are never written to Redis. A replica keeps those of
the clients it served (in memory, like its streams do) to take over their
conversations; with ``upstream_authorization`` every replica can take over
every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .snapshot import ACTIVE, Snapshot
from .store import Store

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

    from .registry import Conversation, Registry

__all__ = ["Change", "RedisStore", "View"]

log = logging.getLogger("sidecar.fleet")

#: Statuses whose conversations are listed for takeover: work in flight, or a human awaited.
WATCHED = ACTIVE | {"awaiting_tool", "awaiting_input"}
#: A change: the reducer applied to a snapshot.
Op = Callable[[Snapshot], Snapshot]

# KEYS: record, watch set, lease ("" when unfenced)
# ARGV: base rev, data, watched (0/1), id, ttl ms, lease value ("" when unfenced),
#       channel, sender, force (0/1)
_WRITE = """
if ARGV[6] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[6] then return {-1} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if ARGV[9] ~= '1' and cur ~= tonumber(ARGV[1]) then
  return {0, cur, redis.call('HGET', KEYS[1], 'data')}
end
local rev = cur + 1
redis.call('HSET', KEYS[1], 'rev', rev, 'data', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[4])
else redis.call('SREM', KEYS[2], ARGV[4]) end
redis.call('PUBLISH', ARGV[7], 'rec\\n' .. ARGV[8] .. '\\n' .. ARGV[4] .. '\\n' .. rev
  .. '\\n' .. ARGV[2])
return {1, rev}
"""
# KEYS: lease, fence counter; ARGV: replica, ttl ms -> {1, value} or {0, holder's value}
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local value = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
"""
# KEYS: leases; ARGV: ttl ms, then each lease's value -> 1 kept / 0 lost, per lease
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1]); out[i] = 1
  else out[i] = 0 end
end
return out
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Change:
    """A change waiting to be written: the reducer's step, and the lease it needs."""

    op: Op
    #: The lease value a stream's change is fenced with ("" for a request's).
    fence: str = ""
    done: asyncio.Future[None] | None = None


@dataclass
class View:
    """A conversation as the fleet shares it."""

    #: The shared revision this replica last read or wrote, and its snapshot.
    rev: int = 0
    base: Snapshot | None = None
    #: Which replica's stream the shared snapshot's ``stream`` describes.
    holder: str | None = None
    #: The holder's position in the upstream's stream, where it has ids.
    last_event_id: str | None = None
    pending: list[Change] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None


def _data(
    snap: Snapshot, transitions: list[dict[str, Any]], holder: str | None, leid: str | None
) -> bytes:
    kept = snap.lasting()
    kept["stream"] = snap.stream
    return orjson.dumps(
        {"snapshot": kept, "transitions": transitions, "holder": holder, "last_event_id": leid}
    )


class StoreError(Exception):
    """Redis could not be used for this call (down, slow, refused)."""


class RedisStore(Store):
    """The shared store: see the module's text."""

    kind = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        password: str | None,
        timeout: float,
        lease_ttl: float,
        retention: float,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.password = password
        self.timeout = timeout
        self.lease_ttl = lease_ttl
        self.retention = retention
        #: This replica's name in leases and messages (host name, pid, random).
        self.replica = f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"
        self.channel = f"{prefix}changes"
        self._redis: Redis | None = None
        self._pubsub: PubSub | None = None
        self._registry: Registry | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Replicas heard from (heartbeat or write), monotonic time.
        self._heard: dict[str, float] = {}
        #: Lease values this replica holds, by subscription key.
        self.leases: dict[str, str] = {}
        #: Who holds a lease (as last learnt), by subscription key.
        self.holders: dict[str, str] = {}
        #: Credentials of clients served, by subscription key: what a takeover
        #: opens the stream with (memory only, as a stream's own are).
        self.standby: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._claiming: set[str] = set()
        #: Counters for operators.
        self.counts: dict[str, int] = {
            "writes": 0,
            "conflicts": 0,
            "fenced": 0,
            "takeovers": 0,
            "errors": 0,
            "reads": 0,
        }
        self._scripts: dict[str, Any] = {}
        #: Reads of a resource's shared snapshot: the one sent, and the one queued behind it.
        self._running: dict[str, asyncio.Task[tuple[Any, Any]]] = {}
        self._queued: dict[str, asyncio.Task[tuple[Any, Any]]] = {}

    # ------------------------------------------------------------ keys
    def _rec(self, resource_id: str) -> str:
        return f"{self.prefix}rec:{resource_id}"

    def _lease(self, key: str) -> str:
        return f"{self.prefix}lease:{key or '*'}"

    # ---------------------------------------------------------- lifecycle
    async def start(self, registry: Registry) -> None:
        """Connect, listen to the fleet's changes, start heartbeats and takeovers."""
        from redis.asyncio import Redis

        self._registry = registry
        self._redis = Redis.from_url(
            self.url,
            password=self.password or None,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        for name, text in (
            ("write", _WRITE),
            ("acquire", _ACQUIRE),
            ("renew", _RENEW),
            ("release", _RELEASE),
        ):
            self._scripts[name] = self._redis.register_script(text)
        try:
            await self._call(self._redis.ping())
        except StoreError as exc:
            self.degrade(str(exc))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="sidecar-fleet-listen"),
            loop.create_task(self._beat(), name="sidecar-fleet-beat"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._redis is not None and self.degraded is None:
            for key, value in list(self.leases.items()):
                with contextlib.suppress(StoreError):
                    await self._call(
                        self._scripts["release"](keys=[self._lease(key)], args=[value])
                    )
            with contextlib.suppress(StoreError):
                await self._call(self._redis.publish(self.channel, f"bye\n{self.replica}"))
        self.leases.clear()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    async def _call(self, awaitable: Any) -> Any:
        """One Redis call, bounded by ``store_timeout``; any failure is a StoreError."""
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(self.timeout):
                return await awaitable
        except (RedisError, OSError, TimeoutError) as exc:
            self.counts["errors"] += 1
            if isinstance(exc, TimeoutError):
                raise StoreError(f"redis did not answer within {self.timeout:g} s") from None
            raise StoreError(f"redis: {type(exc).__name__}: {exc}") from None

    # ---------------------------------------------------------- degrading
    def degrade(self, why: str) -> None:
        if self.degraded is not None:
            return
        self.degraded = why
        log.warning("shared store degraded: going on alone, in memory", extra={"reason": why})
        self.leases.clear()  # they lapse in Redis; fences refuse whatever was in flight
        if self._registry is not None:
            self._registry.fleet_degraded()

    async def _recover(self) -> None:
        """Redis answers again: take the leases this replica can, hand back the rest."""
        registry = self._registry
        assert registry is not None and self._redis is not None
        await self._call(self._redis.ping())
        for conv in registry.conversations():
            if conv.view is not None:
                conv.view.rev = 0  # Redis may have lost everything: its copy is the truth again
        for key in registry.stream_keys():
            value = await self._try_acquire(key)
            if value is None:
                registry.lease_lost(key, follow=False)  # until the holder's copy is read
                continue
            for conv in registry.conversations_of(key):
                await self._force(conv, value)
        self.degraded = None
        log.info("shared store back: resynchronised", extra={"leases": len(self.leases)})
        for conv in registry.conversations():
            if conv.view is not None and conv.id not in self.leases:
                with contextlib.suppress(StoreError):
                    await self.fetch(conv)

    async def _force(self, conv: Conversation, lease: str) -> None:
        """What this replica saw while alone, written over the shared copy."""
        snap = conv.snapshot
        result = await self._call(
            self._scripts["write"](
                keys=[self._rec(conv.id), f"{self.prefix}watch", self._lease(self._key(conv))],
                args=self._write_args(conv, 0, snap, lease, force=True),
            )
        )
        if int(result[0]) == 1 and conv.view is not None:
            conv.view.rev, conv.view.base, conv.view.holder = int(result[1]), snap, self.replica

    # ------------------------------------------------------------ leases
    def _key(self, conv: Conversation) -> str:
        assert self._registry is not None
        return self._registry.stream_key(conv.id)

    async def _try_acquire(self, key: str) -> str | None:
        assert self._redis is not None
        got, value = await self._call(
            self._scripts["acquire"](
                keys=[self._lease(key), f"{self.prefix}fence"],
                args=[self.replica, int(self.lease_ttl * 1000)],
            )
        )
        value = value.decode() if isinstance(value, bytes) else str(value)
        holder = value.rsplit(":", 1)[0]
        self.holders[key] = holder
        if int(got) == 1:
            self.leases[key] = value
            return value
        return None

    def claim_soon(self, key: str, credentials: dict[str, str] | None) -> None:
        """Take the lease of a stream no live replica holds, in the background."""
        if credentials is not None:
            self.standby[key] = credentials
            self.standby.move_to_end(key)
            assert self._registry is not None
            while len(self.standby) > self._registry.settings.max_snapshots:
                self.standby.popitem(last=False)
        if key in self._claiming or key in self.leases or self.degraded is not None:
            return
        holder = self.holders.get(key)
        if holder is not None and self.alive(holder):
            return
        self._claiming.add(key)
        asyncio.get_running_loop().create_task(self._claim(key, []))

    async def _claim(self, key: str, ids: list[str]) -> None:
        """Take the lease of stream ``key`` if it is free, and open the stream;
        ``ids``: conversations to learn of first (orphans no client read here)."""
        registry = self._registry
        assert registry is not None
        self._claiming.add(key)
        try:
            value = await self._try_acquire(key)
            if value is None:
                return
            for resource_id in ids or ([key] if key else []):
                conv = registry.remember(resource_id)
                await self.fetch(conv)
        except StoreError as exc:
            self.degrade(str(exc))
            return
        finally:
            self._claiming.discard(key)
        credentials = self.standby.get(key)
        if credentials is None:
            credentials = registry.own_credentials()
        if not registry.take_over(key, credentials, value):
            await self.release(key)

    async def release(self, key: str) -> None:
        """Give a lease back (another replica may take it at once)."""
        value = self.leases.pop(key, None)
        if value is None or self.degraded is not None:
            return
        # Also at shutdown, when the client may be closing: a lease not given
        # back lapses after lease_ttl anyway.
        with contextlib.suppress(Exception):
            await self._call(self._scripts["release"](keys=[self._lease(key)], args=[value]))

    def alive(self, replica: str) -> bool:
        if replica == self.replica:
            return True
        heard = self._heard.get(replica)
        return heard is not None and time.monotonic() - heard < self.lease_ttl

    async def _beat(self) -> None:
        """Every third of ``lease_ttl``: renew, say we live, take over lapsed leases."""
        every = self.lease_ttl / 3
        while True:
            try:
                if self.degraded is not None:
                    await self._recover()
                else:
                    await self._renew()
                    assert self._redis is not None
                    await self._call(self._redis.publish(self.channel, f"hb\n{self.replica}"))
                    await self._adopt_orphans()
            except StoreError as exc:
                self.degrade(str(exc))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the heartbeat
                log.exception("fleet heartbeat failed")
            if self._registry is not None:
                self._registry.holders_checked()
            await asyncio.sleep(every if self.degraded is None else min(every, 1.0))

    async def _renew(self) -> None:
        if not self.leases:
            return
        keys = list(self.leases)
        kept = await self._call(
            self._scripts["renew"](
                keys=[self._lease(k) for k in keys],
                args=[int(self.lease_ttl * 1000), *(self.leases[k] for k in keys)],
            )
        )
        for key, ok in zip(keys, kept, strict=True):
            if not int(ok) and key in self.leases:
                del self.leases[key]
                log.warning("lease lost: another replica has the stream", extra={"key": key})
                assert self._registry is not None
                self._registry.lease_lost(key)

    async def _adopt_orphans(self) -> None:
        """Conversations with work in flight whose holder is gone: taken over."""
        assert self._redis is not None and self._registry is not None
        watched = await self._call(self._redis.srandmember(f"{self.prefix}watch", 1000))
        if not watched:
            return
        by_key: dict[str, list[str]] = {}
        for member in watched:
            resource_id = member.decode()
            by_key.setdefault(self._registry.stream_key(resource_id), []).append(resource_id)
        for key, ids in by_key.items():
            if key in self.leases or key in self._claiming:
                continue
            if not await self._call(self._redis.exists(self._lease(key))):
                await self._claim(key, ids)

    # ------------------------------------------------------------ reads
    async def fetch(self, conv: Conversation) -> None:
        """The shared snapshot, adopted if newer than this replica's."""
        assert self._redis is not None
        self.counts["reads"] += 1
        rev, data = await self._call(self._redis.hmget(self._rec(conv.id), "rev", "data"))
        if rev is not None and data is not None:
            self._adopt(conv, int(rev), data)

    def fetch_soon(self, resource_id: str) -> asyncio.Task[tuple[Any, Any]] | None:
        """Start reading a shared snapshot (a GET overlaps it with the upstream's answer).

        Reads of one resource are coalesced: a GET joins the read that is
        queued behind the one in flight (it is sent after the GET arrived, so
        it sees every write the GET could have seen), or queues one itself.
        Under load, one Redis read per round trip per resource, not per GET.
        """
        if self._redis is None or self.degraded is not None:
            return None
        queued = self._queued.get(resource_id)
        if queued is not None:
            return queued
        task = asyncio.get_running_loop().create_task(
            self._read(resource_id, self._running.get(resource_id))
        )
        self._queued[resource_id] = task
        task.add_done_callback(_consume)  # read or not, its failure is never left unseen
        return task

    async def _read(
        self, resource_id: str, before: asyncio.Task[tuple[Any, Any]] | None
    ) -> tuple[Any, Any]:
        me = asyncio.current_task()
        if before is not None and not before.done():
            await asyncio.wait([before])
        if self._queued.get(resource_id) is me:
            del self._queued[resource_id]
        self._running[resource_id] = me  # type: ignore[assignment]
        try:
            assert self._redis is not None
            self.counts["reads"] += 1
            result: tuple[Any, Any] = await self._call(
                self._redis.hmget(self._rec(resource_id), "rev", "data")
            )
            return result
        finally:
            if self._running.get(resource_id) is me:
                del self._running[resource_id]

    async def fetched(self, conv: Conversation, task: asyncio.Task[tuple[Any, Any]]) -> None:
        try:
            rev, data = await task
        except StoreError as exc:
            self.degrade(str(exc))
            return
        if rev is not None and data is not None:
            self._adopt(conv, int(rev), data)

    def _adopt(self, conv: Conversation, rev: int, data: bytes) -> None:
        view = conv.view
        if view is None or rev <= view.rev:
            return
        doc = _read_record(view, rev, data)
        if doc is None:
            return
        assert self._registry is not None
        assert view.base is not None
        self._registry.adopt(
            conv, view.base, doc.get("transitions") or [], doc.get("last_event_id")
        )

    async def _listen(self) -> None:
        """Every replica's writes and heartbeats, as they happen."""
        while True:
            try:
                assert self._redis is not None
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                await self._call(self._pubsub.subscribe(self.channel))
                while True:
                    message = await self._pubsub.get_message(timeout=None)
                    if message is not None:
                        self._message(message["data"])
            except asyncio.CancelledError:
                raise
            except StoreError as exc:
                self.degrade(str(exc))
            except Exception as exc:  # the connection broke mid-read
                self.degrade(f"redis: {type(exc).__name__}: {exc}")
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()  # type: ignore[no-untyped-call]
                self._pubsub = None
            await asyncio.sleep(min(1.0, self.lease_ttl / 3))

    def _message(self, payload: bytes) -> None:
        kind, _, rest = payload.partition(b"\n")
        if kind == b"hb":
            self._heard[rest.decode()] = time.monotonic()
            return
        if kind == b"bye":
            self._heard.pop(rest.decode(), None)  # its leases are free: claim at the next beat
            return
        if kind == b"touch":
            sender, _, resource_id = rest.partition(b"\n")
            if sender.decode() != self.replica and self._registry is not None:
                conv = self._registry.get(resource_id.decode())
                if conv is not None:
                    conv.content_changed()  # its body changed upstream: long-polls wake
            return
        if kind != b"rec":
            return
        sender, _, rest = rest.partition(b"\n")
        resource_id, _, rest = rest.partition(b"\n")
        rev, _, data = rest.partition(b"\n")
        self._heard[sender.decode()] = time.monotonic()
        if sender.decode() == self.replica or self._registry is None:
            return
        conv = self._registry.get(resource_id.decode())
        if conv is not None:
            self._adopt(conv, int(rev), data)

    def touch(self, resource_id: str) -> None:
        """A content event (the body changed, not the snapshot): tell the fleet."""
        if self._redis is None or self.degraded is not None:
            return
        task = asyncio.get_running_loop().create_task(
            self._call(self._redis.publish(self.channel, f"touch\n{self.replica}\n{resource_id}"))
        )
        task.add_done_callback(_consume)

    # ------------------------------------------------------------ writes
    def enqueue(self, conv: Conversation, change: Change) -> None:
        view = conv.view
        if view is None or self.degraded is not None or self._redis is None:
            if change.done is not None and not change.done.done():
                change.done.set_result(None)
            return
        view.pending.append(change)
        if view.writer is None or view.writer.done():
            view.writer = asyncio.get_running_loop().create_task(self._write(conv))

    def _write_args(
        self, conv: Conversation, base_rev: int, snap: Snapshot, lease: str, force: bool = False
    ) -> list[Any]:
        sub = conv.subscription
        leid = (sub.decoder.last_event_id or None) if sub is not None else None
        holder = self.replica if lease else (conv.view.holder if conv.view else None)
        return [
            base_rev,
            _data(snap, conv.transitions, holder, leid),
            int(snap.status in WATCHED),
            conv.id,
            int(self.retention * 1000),
            lease,
            self.channel,
            self.replica,
            int(force),
        ]

    async def _write(self, conv: Conversation) -> None:
        view = conv.view
        assert view is not None
        while view.pending and self.degraded is None:
            batch = list(view.pending)
            fence = next((c.fence for c in reversed(batch) if c.fence), "")
            base = view.base if view.base is not None else conv.snapshot
            snap = base
            for change in batch:
                snap = change.op(snap)
            try:
                result = await self._call(
                    self._scripts["write"](
                        keys=[
                            self._rec(conv.id),
                            f"{self.prefix}watch",
                            self._lease(self._key(conv)),
                        ],
                        args=self._write_args(conv, view.rev, snap, fence),
                    )
                )
            except StoreError as exc:
                self.degrade(str(exc))
                break
            outcome = int(result[0])
            if outcome == -1:
                # The lease is another replica's now: this stream's changes are not the truth.
                self.counts["fenced"] += 1
                view.pending = [c for c in view.pending if not c.fence]
                key = self._key(conv)
                self.leases.pop(key, None)
                assert self._registry is not None
                self._registry.lease_lost(key)
                continue
            if outcome == 0:
                self.counts["conflicts"] += 1
                if result[2] is None or _read_record(view, int(result[1]), result[2]) is None:
                    view.rev = int(result[1])
                continue
            self.counts["writes"] += 1
            view.rev, view.base = int(result[1]), snap
            if fence:
                view.holder = self.replica
            del view.pending[: len(batch)]
            for change in batch:
                if change.done is not None and not change.done.done():
                    change.done.set_result(None)
            assert self._registry is not None
            self._registry.rebased(conv)
        for change in view.pending if self.degraded is not None else ():
            if change.done is not None and not change.done.done():
                change.done.set_result(None)
        if self.degraded is not None:
            view.pending.clear()

    async def written(self, changes: Iterable[asyncio.Future[None]]) -> None:
        """Wait (at most ``store_timeout``) for changes to be in the shared store."""
        waiting = [c for c in changes if not c.done()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await asyncio.gather(*waiting)


def _read_record(view: View, rev: int, data: bytes) -> dict[str, Any] | None:
    """A shared record (revision ``rev``) made the view's base; None if unreadable."""
    try:
        doc = orjson.loads(data)
        base = Snapshot.restored(doc["snapshot"], stream=doc["snapshot"].get("stream"))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    view.rev, view.base, view.holder = rev, base, doc.get("holder")
    view.last_event_id = doc.get("last_event_id")
    return dict(doc)


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
