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
  stream being live. A trigger is noted in the shared copy before it is
  forwarded (``forwarded_at``, cleared by its answer): a step sent by a
  replica killed before the upstream answered is judged the same way by the
  one taking its stream over, even when the status still shows the step
  before's outcome (the lost replica alone saw it start).
* **Redis down or slow never stops the proxy.** Every call is bounded by
  ``store_timeout``; on a failure the replica marks the store degraded
  (``/readyz`` stays 200 and says so, as does ``sidecar_store_degraded``),
  opens its own streams for what it serves, and goes on in memory. A single
  failed call on a pooled connection that died with a restarted Redis is
  retried once on a new one, not taken as an outage; a restart is then
  noticed by Redis's ``run_id`` (``INFO``, at every heartbeat, and whenever
  the subscription reconnects, before any message it brings is read), and
  every conversation the replica does not hold is read afresh and the
  newest state the replica saw in the shared copy (``View.known``) written
  back where Redis has an older state (no outage: its leases stay, and one
  Redis lost is set again at the next renewal, what the stream showed merged
  in). When Redis answers again after an outage a replica takes the
  leases it can (its own too: a lease it held is renewed, not mistaken for
  another's), merges what it saw meanwhile into the shared copy by
  compare-and-set (the newer *state* of the two, so a step accepted
  elsewhere since is kept), and hands the rest back to their holders. What
  Redis lost (restarted empty or from an older save) is written back by
  every replica that knew newer, not only by the holders: the holder that
  saw a step end may be the replica that was killed. Newer is by when the
  work's state last changed (``state_at``, carried with the state, never
  moved by learning it or by a stream; each replica's clock); ``unknown``
  never wins over a state; a replica that finds the same state or a newer
  one writes nothing (a fleet's recovery is a read per conversation and
  replica, not a write).

* **Nothing read back is trusted**: every hash, lease value, set member and
  channel message is checked (:mod:`sidecar.records`) before use. A record
  that fails is deleted (if it is still the one read) and the deletion
  announced: the lease holder writes what its stream showed, the other
  replicas read ``unknown`` until then.
* **Bodies have a shared version** (``body`` in the record): content events
  and writes through any replica bump it, so every replica computes the same
  ETag for the same body and snapshot (:mod:`sidecar.validators`).
* **A shutdown never waits on Redis**: every step of :meth:`RedisStore.aclose`
  is bounded, and the background loops end even if a cancellation is
  swallowed inside the client (Python 3.11's ``asyncio.wait_for``, which
  redis-py uses for socket writes, returns the result of an operation that
  finished as the task was cancelled, and the cancellation is lost).

A client's credentials are never written to Redis. A replica keeps those of
the clients it served (in memory, like its streams do) to take over their
conversations; with ``upstream_authorization`` every replica can take over
every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from ..core.snapshot import ACTIVE, Snapshot, state_date
from . import records
from .conversation import Change, Conversation, View
from .ports import FleetHost, Transitions
from .records import Rejected, SharedRecord
from .store import Store, StoreRefused, refuse_other_upstream, upstream_label

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = ["RedisStore"]

log = logging.getLogger("sidecar.fleet")

#: Statuses whose conversations are listed for takeover: work in flight, or a
#: human awaited (and any with a trigger noted as forwarded, not answered yet).
WATCHED = ACTIVE | {"awaiting_tool", "awaiting_input"}

# KEYS: record, watch set, lease ("" when unfenced), then webhook outbox lists
# ARGV: base rev, data, watched (0/1), id, ttl ms, lease value ("" when unfenced),
#       channel, sender, force (0/1), lease ttl ms, the outbox lists' bound,
#       then one entry per list
# A fenced write is refused if the lease is another's; a lease that is gone
# (Redis lost it, or it lapsed and nobody took it) is this writer's again.
# (A revision that is no number, written there by something else, counts as
# none: the writer that read none writes over it.)
# The new revision is at least Redis's time in ms: revisions never go back,
# not after a record was dropped or overwritten with a lower one, nor after
# Redis lost everything (a replica that read revision n ignores every
# revision up to n as known).
# The transitions the write makes are pushed to the webhook outbox lists in
# the same script (a full list refuses its entry: returned, counted).
_WRITE = """
if ARGV[6] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  if not holder then redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[10])
  elseif holder ~= ARGV[6] then return {-1} end
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0') or 0
if ARGV[9] ~= '1' and cur ~= tonumber(ARGV[1]) then
  return {0, cur, redis.call('HGET', KEYS[1], 'data')}
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rev = string.format('%.0f', math.max(cur + 1, ms))
redis.call('HSET', KEYS[1], 'rev', rev, 'data', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[4])
else redis.call('SREM', KEYS[2], ARGV[4]) end
redis.call('PUBLISH', ARGV[7], 'rec\\n' .. ARGV[8] .. '\\n' .. ARGV[4] .. '\\n' .. rev
  .. '\\n' .. ARGV[2])
local refused = {}
for i = 4, #KEYS do
  if redis.call('LLEN', KEYS[i]) < tonumber(ARGV[11]) then redis.call('RPUSH', KEYS[i], ARGV[i + 8])
  else refused[#refused + 1] = i - 3 end
end
return {1, rev, refused}
"""
# KEYS: lease, fence counter; ARGV: replica, ttl ms
# -> {1, value} (taken, or this replica's own renewed) or {0, holder's value, ms left}
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  if string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, cur}
  end
  return {0, cur, redis.call('PTTL', KEYS[1])}
end
local value = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
"""
# KEYS: leases; ARGV: ttl ms, then each lease's value -> 1 kept / 0 lost, per lease
# (2: Redis had lost it, restarted empty or from an older save: set again)
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if cur == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1]); out[i] = 1
  elseif not cur then
    redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1]); out[i] = 2
  else out[i] = 0 end
end
return out
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A content event or a write: the body's version moves on (never back, not
# even after Redis lost everything: it is at least the time in ms).
# KEYS: record; ARGV: channel, sender, id, ttl ms -> the new version
_TOUCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local body = math.max(tonumber(redis.call('HGET', KEYS[1], 'body') or '0') + 1, now)
local text = string.format('%.0f', body)
redis.call('HSET', KEYS[1], 'body', text)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[1], 'touch\\n' .. ARGV[2] .. '\\n' .. ARGV[3] .. '\\n' .. text)
return text
"""
# A record that failed its checks, deleted if it is still the one read.
# KEYS: record, watch set; ARGV: its rev as read, channel, sender, id
# -> the time of the drop (ms, Redis's clock: every replica dates what follows after it)
_DROP = """
if redis.call('HGET', KEYS[1], 'rev') ~= ARGV[1] then return false end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[4])
local t = redis.call('TIME')
local at = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
redis.call('PUBLISH', ARGV[2], 'drop\\n' .. ARGV[3] .. '\\n' .. ARGV[4] .. '\\n' .. at)
return at
"""


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
        upstream: str = "",
        adopt: bool = False,
        limit: int = 4 * 1024 * 1024,
        standby_max: int = 10000,
    ) -> None:
        """``standby_max``: credentials kept for takeovers, at most (one per
        stream key; the registry's ``max_snapshots``); ``limit``: what one
        field read back may hold (``max_event_bytes``)."""
        super().__init__()
        self.url = url
        self.upstream = upstream
        self.adopt = adopt
        #: max_event_bytes: what one field read back may hold.
        self.limit = limit
        self._closing = False
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
        self._registry: FleetHost | None = None
        #: Who hears of the transitions this replica writes (the webhooks).
        self.transitions: Transitions | None = None
        self._standby_max = standby_max
        self._tasks: list[asyncio.Task[None]] = []
        #: Replicas heard from (heartbeat or write), monotonic time.
        self._heard: dict[str, float] = {}
        #: Lease values this replica holds, by subscription key.
        self.leases: dict[str, str] = {}
        #: When each was last taken or renewed (monotonic, as the call was sent).
        self._renewed: dict[str, float] = {}
        #: Changes of streams whose lease was not known to be fresh, by key.
        self._held_back: dict[str, list[Callable[[], object]]] = {}
        self._renewing = False
        #: Who holds a lease (as last learnt), by subscription key.
        self.holders: dict[str, str] = {}
        #: Credentials of clients served, by subscription key: what a takeover
        #: opens the stream with (memory only, as a stream's own are).
        self.standby: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._claiming: set[str] = set()
        #: Conversations whose body, or snapshot, changed while Redis could not be told.
        self._touched_alone: set[str] = set()
        self._changed_alone: set[str] = set()
        #: Redis's run_id as last seen (None: not asked yet; False: INFO refused).
        self._run_id: str | bool | None = None
        self._resyncing: asyncio.Task[None] | None = None
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
    async def start(self, registry: FleetHost) -> None:
        """Connect, listen to the fleet's changes, start heartbeats and takeovers."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self._registry = registry
        self._redis = Redis.from_url(
            self.url,
            password=self.password or None,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # A pooled connection that died with a restarted Redis fails on
            # its next use: once more on a new connection, within the same
            # store_timeout, before the store counts as down.
            retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
            health_check_interval=0,
        )
        for name, text in (
            ("write", _WRITE),
            ("acquire", _ACQUIRE),
            ("renew", _RENEW),
            ("release", _RELEASE),
            ("touch", _TOUCH),
            ("drop", _DROP),
        ):
            self._scripts[name] = self._redis.register_script(text)
        try:
            await self._call(self._redis.ping())
            await self._check_upstream()
        except StoreError as exc:
            self.degrade(str(exc))
        except StoreRefused:
            await self._close_client()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="sidecar-fleet-listen"),
            loop.create_task(self._beat(), name="sidecar-fleet-beat"),
        ]

    async def _check_upstream(self) -> None:
        """The fleet's keys say which upstream they are for; another's is refused."""
        assert self._redis is not None
        if not self.upstream:
            return
        label = upstream_label(self.upstream)
        key = f"{self.prefix}upstream"
        await self._call(self._redis.set(key, label, nx=True))
        found = await self._call(self._redis.get(key))
        made_for = found.decode("utf-8", "replace") if isinstance(found, bytes) else label
        if made_for == label:
            return
        if not self.adopt:
            raise refuse_other_upstream(
                f"redis prefix {self.prefix!r}", made_for[:200], self.upstream
            )
        log.warning(
            "shared store made for another upstream: adopted (store_adopt)",
            extra={"prefix": self.prefix, "made_for": made_for[:200], "upstream": label},
        )
        await self._call(self._redis.set(key, label))

    async def aclose(self) -> None:
        """Give the leases back and disconnect; every step bounded (by
        ``store_timeout``), so that a shutdown never waits on Redis."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # (A loop whose cancellation was swallowed sees _closing and ends.)
            await asyncio.wait(self._tasks, timeout=max(self.timeout, self.lease_ttl / 3) + 0.5)
        if self._redis is not None and self.degraded is None:
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(2 * self.timeout):  # all of them, not each
                    for key, value in list(self.leases.items()):
                        await self._call(
                            self._scripts["release"](keys=[self._lease(key)], args=[value])
                        )
                    await self._call(self._redis.publish(self.channel, f"bye\n{self.replica}"))
        self.leases.clear()
        await self._close_client()

    def _forget_subscription(self) -> None:
        """The check on reconnects taken off the subscription's connection
        (it goes back to the pool with the subscription, for any command)."""
        connection = getattr(self._pubsub, "connection", None)
        if connection is not None:
            connection.deregister_connect_callback(self._subscribed)

    async def _close_client(self) -> None:
        self._forget_subscription()
        if self._resyncing is not None:
            self._resyncing.cancel()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    # (untyped before redis-py 8.2, typed since)
                    await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            self._pubsub = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
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
        """Redis answers again: take the leases this replica can (its own
        included), merge what it saw meanwhile, hand back the rest."""
        registry = self._registry
        assert registry is not None and self._redis is not None
        await self._call(self._redis.ping())
        await self._restarted()  # the run_id recovered from (no second resync for it)
        try:
            await self._check_upstream()
        except StoreRefused as exc:
            # Another fleet's keys now (a Redis reused, a prefix mistaken):
            # alone is safer than mixing two upstreams' conversations.
            if self.degraded != str(exc):
                log.warning("shared store refused: staying alone", extra={"reason": str(exc)})
                self.degraded = str(exc)
            return
        for conv in registry.conversations():
            if conv.view is not None:
                # Redis may have lost everything (or kept it): its copy is
                # read afresh, the first write of each merges with it.
                conv.view.rev, conv.view.base = 0, Snapshot(session_id=conv.snapshot.session_id)
        held = []
        for key in registry.stream_keys():
            value = await self._try_acquire(key)
            if value is None:
                registry.lease_lost(key, follow=False)  # until the holder's copy is read
            else:
                held.append(key)
        self.degraded = None
        log.info("shared store back: resynchronised", extra={"leases": len(self.leases)})
        merged = set()
        for key in held:
            for conv in registry.conversations_of(key):
                self._merge_seen(conv, self.leases.get(key, ""))
                merged.add(conv.id)
        for resource_id in self._changed_alone - merged:
            alone = registry.get(resource_id)
            if alone is not None and alone.view is not None:
                self._merge_seen(alone, "")
                merged.add(resource_id)
        self._changed_alone.clear()
        for conv in registry.conversations():
            if conv.view is not None and self._key(conv) not in self.leases:
                with contextlib.suppress(StoreError):
                    if conv.id in merged:
                        await self.fetch(conv)
                    else:
                        await self._write_back(conv)
        for resource_id in self._touched_alone:
            self.touch(resource_id)  # its body may have changed meanwhile, unseen by Redis
        self._touched_alone.clear()

    async def _write_back(self, conv: Conversation, seen: Snapshot | None = None) -> None:
        """What this replica knows of a conversation it does not hold, written
        back if Redis came back without it, or with an older state (restarted
        empty, or from an older save): the holder that saw the newest outcome
        may be gone (killed while Redis was down), and the first replica
        back may have missed its announcement; every replica that heard of
        it then writes it, by compare-and-set, and the newest state wins.
        Otherwise Redis's copy is adopted, as a read adopts it. Nothing is
        written for what this replica knows nothing of, nor where Redis has
        the same state or a newer one (a fleet's recovery is then one read
        per conversation and replica, not one write). Decided on the newest
        state it saw in the shared copy (``View.known``), not on what it
        shows: a poll may have adopted the older record first. (``seen``:
        what it knew when the restart was found.)"""
        assert self._redis is not None
        view = conv.view
        if view is None:
            return
        if seen is None:
            seen = view.known or conv.snapshot
        self.counts["reads"] += 1
        rev, data, body = await self._call(
            self._redis.hmget(self._rec(conv.id), "rev", "data", "body")
        )
        if body is not None:
            self._learn_body(conv, body)
        record = None
        if rev is not None or data is not None:
            record = self._checked(conv.id, rev, data, None)
            if record is None:
                return  # dropped: observed afresh, as any malformed record
        shared = record.snapshot if record is not None else None
        if seen.status != "unknown" and (
            shared is None or shared.status == "unknown" or state_date(shared) < state_date(seen)
        ):
            if record is not None:
                _take(view, record)
            else:  # nothing there: written as the first record
                view.rev, view.base = 0, Snapshot(session_id=seen.session_id)
            self._merge_seen(conv, "", seen)
        elif record is not None:
            view.rev = 0  # (a Redis back from an older save has lower revisions)
            self._adopt(conv, record)

    def _merge_seen(self, conv: Conversation, lease: str, seen: Snapshot | None = None) -> None:
        """What this replica's stream showed while it was alone (or ``seen``:
        what it knew), merged into the shared copy by compare-and-set: the
        newer *state* wins, by when the work's state last changed
        (``state_at``), not by ``updated_at``, which moves whenever a replica
        learns a state or its stream changes (the first replica back after
        Redis lost everything may write an older outcome, dated now). A step
        accepted on another replica since Redis came back is newer, and kept.
        What is written is dated after what it replaces: no reader sees the
        time go back."""
        if seen is None:
            seen = conv.snapshot
        known = seen

        def newer(shared: Snapshot) -> Snapshot:
            if shared.status != "unknown":
                if known.status == "unknown":
                    return shared  # knowing nothing adds nothing to a state
                if state_date(shared) > state_date(known):
                    return shared
                if (
                    not lease
                    and state_date(shared) == state_date(known)
                    and (shared.updated_at or 0) >= (known.updated_at or 0)
                ):
                    return shared  # the same state, as told since: nothing to add
            # Not the holder: its own stream was closed, the holder's says how the stream is.
            merged = known if lease else dataclasses.replace(known, stream=shared.stream)
            if shared.updated_at is not None and (merged.updated_at or 0) <= shared.updated_at:
                merged = dataclasses.replace(merged, **shared.touched())
            # A version above both: a receiver keeping the highest drops nothing newer.
            return dataclasses.replace(merged, version=max(merged.version, shared.version) + 1)

        self.enqueue(conv, Change(newer, lease))

    # ------------------------------------------------------------ leases
    def _key(self, conv: Conversation) -> str:
        assert self._registry is not None
        return self._registry.stream_key(conv.id)

    async def _try_acquire(self, key: str) -> str | None:
        assert self._redis is not None
        sent = time.monotonic()
        result = await self._call(
            self._scripts["acquire"](
                keys=[self._lease(key), f"{self.prefix}fence"],
                args=[self.replica, int(self.lease_ttl * 1000)],
            )
        )
        raw = result[1]
        value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if int(result[0]) == 1:
            self.holders[key] = self.replica
            self.leases[key] = value
            self._renewed[key] = sent
            return value
        try:
            holder = records.replica_name(value.rsplit(":", 1)[0])
        except Rejected as exc:
            # Not a lease any replica wrote: nobody is believed to hold it,
            # and it lapses on its own (its expiry was set by whoever wrote it).
            self.rejections.reject("redis lease", exc, value)
            self.holders.pop(key, None)
            return None
        self.holders[key] = holder
        left = result[2] if len(result) > 2 else None
        if isinstance(left, int) and 0 < left <= self.lease_ttl * 1000:
            # The lease was set or renewed (lease_ttl - left) ago: the holder lived then.
            renewed = time.monotonic() - (self.lease_ttl - left / 1000)
            if renewed > self._heard.get(holder, 0.0):
                self._heard[holder] = renewed
        return None

    def claim_soon(self, key: str, credentials: dict[str, str] | None) -> None:
        """Take the lease of a stream no live replica holds, in the background."""
        if credentials is not None:
            self.standby[key] = credentials
            self.standby.move_to_end(key)
            while len(self.standby) > self._standby_max:
                self.standby.popitem(last=False)
        if key in self._claiming or key in self.leases or self.degraded is not None:
            return
        holder = self.holders.get(key)
        if holder is not None and holder != self.replica and self.alive(holder):
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

    def holds(self, key: str) -> bool:
        """Whether this replica may act on stream ``key`` now: it holds the
        lease and renewed it less than ``lease_ttl`` ago. A replica frozen
        past its lease (SIGSTOP, a long pause) may still read events queued
        on its old stream when it wakes: they are not acted on, since the
        lease may be another's by then (the next renewal tells)."""
        if key not in self.leases:
            return False
        return time.monotonic() - self._renewed.get(key, 0.0) < self.lease_ttl

    def hold_back(self, key: str, apply: Callable[[], object]) -> None:
        """A change from stream ``key`` while :meth:`holds` is unsure: kept
        until the lease is renewed (then applied, in order) or lost (dropped:
        the new holder's stream has the same events). A renewal is sent now."""
        self._held_back.setdefault(key, []).append(apply)
        if not self._renewing:
            self._renewing = True
            task = asyncio.get_running_loop().create_task(self._renew_now())
            task.add_done_callback(_consume)

    async def _renew_now(self) -> None:
        try:
            await self._renew()
        except StoreError as exc:
            self.degrade(str(exc))
        finally:
            self._renewing = False
            self._replay()

    def _replay(self) -> None:
        for key in list(self._held_back):
            if self.degraded is not None:
                # Alone now: this replica's stream is the one it goes by, and
                # what it showed is merged into the shared copy at recovery
                # (dropped, a step that ended during a pause would read as
                # running here for ever).
                for apply in self._held_back.pop(key):
                    apply()
            elif key not in self.leases:
                del self._held_back[key]  # lost: the new holder's stream has them
            elif self.holds(key):
                for apply in self._held_back.pop(key):
                    apply()

    def believed(self, holder: str | None, key: str) -> bool:
        """Whether ``holder``, named by a shared record as the holder of stream
        ``key``, is believed to watch it: this replica only while it holds the
        lease (a record it wrote can outlive its lease), another while it is heard."""
        if holder == self.replica:
            return key in self.leases
        return self.alive(holder or "")

    def alive(self, replica: str) -> bool:
        if replica == self.replica:
            return True
        heard = self._heard.get(replica)
        return heard is not None and time.monotonic() - heard < self.lease_ttl

    async def _beat(self) -> None:
        """Every third of ``lease_ttl``: renew, say we live, take over lapsed leases."""
        every = self.lease_ttl / 3
        me = asyncio.current_task()
        while not self._closing and not (me is not None and me.cancelling()):
            try:
                if self.degraded is not None:
                    await self._recover()
                else:
                    await self._renew()
                    assert self._redis is not None
                    await self._call(self._redis.publish(self.channel, f"hb\n{self.replica}"))
                    if await self._restarted():
                        await self._resync()
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

    async def _restarted(self) -> bool:
        """Whether Redis restarted since it was last asked (``INFO``'s run_id):
        it may have lost what it held, or come back from an older save, with
        no call of this replica failing (a pooled connection is retried on a
        new one, the subscription renewed by redis-py itself). The first
        caller to see a new run_id is told, once."""
        if self._run_id is False or self._redis is None:
            return False
        try:
            info = await self._call(self._guarded(self._redis.info("server")))
        except _Refused as exc:
            if exc.for_good:
                # An ACL without INFO: the lease holders still notice (their renewal).
                log.warning(
                    "redis refused INFO: a restart is noticed by the lease holders only",
                    extra={"reason": str(exc)[:200]},
                )
                self._run_id = False
            return False  # (another refusal, BUSY: asked again at the next beat)
        run_id = info.get("run_id") if isinstance(info, dict) else None
        if not isinstance(run_id, str) or not run_id:
            return False
        before, self._run_id = self._run_id, run_id
        return isinstance(before, str) and before != run_id

    async def _resync(self, known: list[tuple[Conversation, Snapshot]] | None = None) -> None:
        """Redis restarted, and this replica did not see it go: no outage to
        recover from (its leases, where Redis kept them, are still its own;
        where it lost them, the next renewal sets them again and merges what
        the stream showed). Every conversation it does not hold is read
        afresh, and what it knows written back where Redis has an older
        state or none (:meth:`_write_back`). ``known``: what it knew when the
        restart was found (:meth:`_known_now`)."""
        if known is None:
            known = self._known_now()
        log.warning("redis restarted: its copy is read afresh, and written back where older")
        try:
            for conv, seen in known:
                await self._write_back(conv, seen)
        except StoreError as exc:
            self.degrade(str(exc))  # then the recovery writes back everything

    def _known_now(self) -> list[tuple[Conversation, Snapshot]]:
        """What this replica knows of each conversation it does not hold, as
        the restart is found: a record adopted afterwards (another replica's
        write-back of an older state) cannot change what it writes back."""
        registry = self._registry
        if registry is None:
            return []
        return [
            (conv, conv.view.known or conv.snapshot)
            for conv in registry.conversations()
            if conv.view is not None and self._key(conv) not in self.leases
        ]

    async def _subscribed(self, connection: Any) -> None:
        """The subscription's connection (re)opened (redis-py reconnects it by
        itself): a Redis restarted meanwhile is found out here, before any
        message it brings is read (another replica's write-back of an older
        state would otherwise be adopted first)."""
        if self._pubsub is None or connection is not getattr(self._pubsub, "connection", None):
            return  # a connection the subscription gave back to the pool
        try:
            restarted = await self._restarted()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the heartbeat asks again; the subscription goes on
            log.warning("redis restart check failed", extra={"reason": str(exc)[:200]})
            return
        if restarted:
            # Decided now, written in a task of its own: the subscription's
            # messages are not held up by the writes.
            known = self._known_now()
            self._resyncing = asyncio.get_running_loop().create_task(self._resync(known))
            self._resyncing.add_done_callback(_consume)

    @staticmethod
    async def _guarded(awaitable: Any) -> Any:
        """``awaitable``, a refusal of the command told apart from an outage."""
        from redis.exceptions import NoPermissionError, ResponseError

        try:
            return await awaitable
        except NoPermissionError as exc:
            raise _Refused(str(exc), for_good=True) from None
        except ResponseError as exc:
            raise _Refused(str(exc), for_good="unknown command" in str(exc).lower()) from None

    async def _renew(self) -> None:
        try:
            await self._renew_leases()
        finally:
            self._replay()

    async def _renew_leases(self) -> None:
        if not self.leases:
            return
        keys = list(self.leases)
        sent = time.monotonic()
        kept = await self._call(
            self._scripts["renew"](
                keys=[self._lease(k) for k in keys],
                args=[int(self.lease_ttl * 1000), *(self.leases[k] for k in keys)],
            )
        )
        for key, ok in zip(keys, kept, strict=True):
            if int(ok) and key in self.leases:
                self._renewed[key] = sent
                if int(ok) == 2 and self._registry is not None:
                    # Redis lost its data without this replica noticing (a
                    # restart between two calls): what the stream showed is
                    # written again, as after an outage.
                    for conv in self._registry.conversations_of(key):
                        if conv.view is not None:
                            conv.view.rev = 0
                            self._merge_seen(conv, self.leases[key])
            elif key in self.leases:
                del self.leases[key]
                self.holders.pop(key, None)  # not known: the next claim asks Redis
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
            try:
                resource_id = records.resource_id(member)
                if not self._registry.valid_id(resource_id):
                    raise Rejected("id", "not an id of the profile")
            except Rejected as exc:
                self.rejections.reject("redis watch set", exc, repr(member)[:80])
                await self._call(self._redis.srem(f"{self.prefix}watch", member))
                continue
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
        found = await self._call(self._redis.hmget(self._rec(conv.id), "rev", "data", "body"))
        self._found(conv, found)

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
                self._redis.hmget(self._rec(resource_id), "rev", "data", "body")
            )
            return result
        finally:
            if self._running.get(resource_id) is me:
                del self._running[resource_id]

    async def snapshots(self, resource_ids: list[str]) -> dict[str, Snapshot]:
        """The shared snapshots of these resources, in one round trip, for a
        list (nothing is adopted: the replica does not follow them). A stream
        whose holder no longer beats reads ``reconnecting``, as in ``rebased``."""
        if self._redis is None or self.degraded is not None or self._registry is None:
            return {}
        self.counts["reads"] += 1
        pipe = self._redis.pipeline(transaction=False)
        for resource_id in resource_ids:
            pipe.hmget(self._rec(resource_id), "rev", "data", "body")
        try:
            rows = await self._call(pipe.execute())
        except StoreError as exc:
            self.degrade(str(exc))
            return {}
        found = {}
        for resource_id, (rev, data, body) in zip(resource_ids, rows, strict=True):
            if rev is None or data is None:
                continue
            record = self._checked(resource_id, rev, data, body)
            if record is None:
                continue  # an unreadable record shows nothing, never a guess
            snap = record.snapshot
            if snap.stream == "live" and not self.believed(
                record.holder, self._registry.stream_key(resource_id)
            ):
                snap = dataclasses.replace(snap, stream="reconnecting")
            found[resource_id] = snap
        return found

    async def fetched(self, conv: Conversation, task: asyncio.Task[tuple[Any, Any]]) -> None:
        try:
            found = await task
        except StoreError as exc:
            self.degrade(str(exc))
            return
        self._found(conv, found)

    def _found(self, conv: Conversation, found: Any) -> None:
        """A record as read (rev, data, body): checked, then adopted if newer."""
        rev, data, body = found
        if rev is None and data is None:
            if body is not None:
                self._learn_body(conv, body)
            return
        view = conv.view
        if view is not None and isinstance(rev, bytes) and rev.isdigit() and len(rev) < 17:
            if int(rev) <= view.rev:
                # Known already (most reads, under load): only the body's version may be new.
                if body is not None:
                    self._learn_body(conv, body)
                if int(rev) < view.rev:
                    # Older than one known (a read sent before a write), never
                    # adopted; or written there under an older revision by
                    # something else: checked all the same, dropped if bad.
                    self._checked(conv.id, rev, data, None)
                return
        record = self._checked(conv.id, rev, data, body)
        if record is not None:
            self._learn_body(conv, record.body)
            self._adopt(conv, record)

    def _checked(self, resource_id: str, rev: Any, data: Any, body: Any) -> SharedRecord | None:
        """The record, or None (then it is dropped: see the module's text)."""
        try:
            return records.shared_record(rev, data, self.limit, body)
        except Rejected as exc:
            self.rejections.reject("redis record", exc, resource_id)
            self._drop_soon(resource_id, rev)
            return None

    def _drop_soon(self, resource_id: str, rev: Any) -> None:
        if self._redis is None or self.degraded is not None:
            return
        task = asyncio.get_running_loop().create_task(self._drop(resource_id, rev))
        task.add_done_callback(_consume)

    async def _drop(self, resource_id: str, rev: Any) -> None:
        token = rev if isinstance(rev, bytes | str) else b""
        try:
            at = await self._call(
                self._scripts["drop"](
                    keys=[self._rec(resource_id), f"{self.prefix}watch"],
                    args=[token, self.channel, self.replica, resource_id],
                )
            )
        except StoreError as exc:
            self.degrade(str(exc))
            return
        conv = self._registry.get(resource_id) if self._registry is not None else None
        if at is not None and conv is not None:  # (None: rewritten since it was read)
            self._dropped(conv, records.count(at, "drop time") / 1000)

    def _dropped(self, conv: Conversation, at: float) -> None:
        """The shared record was dropped at ``at`` (Redis's clock): the holder
        writes what its stream showed; any other replica knows nothing any
        more (``unknown``), dated then."""
        view = conv.view
        if view is None or self._registry is None:
            return
        view.rev = 0
        key = self._key(conv)
        lease = self.leases.get(key)
        if not lease and self._registry.watching(key):
            return  # its own stream is open here: it observed, it does not forget
        if lease:
            # Written again as a change after the drop: other replicas read
            # unknown since, and a reader's time must not go back.
            seen = conv.snapshot
            view.base = Snapshot(session_id=seen.session_id)
            when = max(time.time(), at + 0.001)
            self.enqueue(
                conv, Change(lambda _shared: dataclasses.replace(seen, **seen.touched(when)), lease)
            )
            return
        view.base = Snapshot(session_id=conv.snapshot.session_id, stream=conv.snapshot.stream)
        view.holder = None
        self._registry.forget_state(conv, at)

    def _adopt(self, conv: Conversation, record: SharedRecord) -> None:
        view = conv.view
        if view is None or record.rev <= view.rev:
            return
        _take(view, record)
        assert self._registry is not None
        self._registry.adopt(conv, record.snapshot, record.transitions, record.last_event_id)

    def _learn_body(self, conv: Conversation, body: Any) -> None:
        """The body's shared version, read or announced: newer ones only."""
        view = conv.view
        if view is None:
            return
        try:
            value = records.count(body, "body")
        except Rejected as exc:
            self.rejections.reject("redis record", exc, conv.id)
            return
        if value > view.body:
            view.body_before, view.body = view.body, value
            conv.content_changed()
            view.body_epoch = conv.epoch

    async def _listen(self) -> None:
        """Every replica's writes and heartbeats, as they happen."""
        me = asyncio.current_task()
        while not self._closing and not (me is not None and me.cancelling()):
            try:
                assert self._redis is not None
                self._forget_subscription()
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                await self._call(self._pubsub.subscribe(self.channel))
                connection = getattr(self._pubsub, "connection", None)
                if connection is not None:
                    connection.register_connect_callback(self._subscribed)
                while not self._closing:
                    message = await self._pubsub.get_message(timeout=1.0)
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
                    await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
                self._pubsub = None
            await asyncio.sleep(min(1.0, self.lease_ttl / 3))

    def _message(self, payload: Any) -> None:
        try:
            self._handle(payload)
        except Rejected as exc:
            self.rejections.reject("redis channel", exc, repr(payload)[:80])

    def _handle(self, payload: Any) -> None:
        """One message of the channel, checked field by field as it is read."""
        if not isinstance(payload, bytes):
            raise Rejected("shape", "a message is not bytes")
        if len(payload) > records.record_limit(self.limit):
            raise Rejected("size", "a message is larger than any record")
        kind, _, rest = payload.partition(b"\n")
        if kind in (b"hb", b"bye"):
            sender = records.replica_name(rest)
            if kind == b"hb":
                self._heard[sender] = time.monotonic()
            else:
                self._heard.pop(sender, None)  # its leases are free: claim at the next beat
            return
        if kind not in (b"touch", b"rec", b"drop"):
            raise Rejected("shape", "a message of no kind this version sends")
        raw_sender, _, rest = rest.partition(b"\n")
        sender = records.replica_name(raw_sender)
        raw_id, _, rest = rest.partition(b"\n")
        resource_id = records.resource_id(raw_id)
        if kind == b"rec":
            raw_rev, _, data = rest.partition(b"\n")
            record = records.shared_record(raw_rev, data, self.limit)
            self._heard[sender] = time.monotonic()
        elif kind == b"touch":
            body = records.count(rest, "body")
        else:
            at = records.count(rest, "drop time") / 1000
        if sender == self.replica or self._registry is None:
            return
        conv = self._registry.get(resource_id)
        if conv is None:
            return
        if kind == b"rec":
            self._adopt(conv, record)
        elif kind == b"touch":
            self._learn_body(conv, body)  # its body changed upstream: long-polls wake
        else:
            self._dropped(conv, at)

    def touch(self, resource_id: str) -> None:
        """A content event or a write (the body changed, not the snapshot):
        the body's version moves on, and the fleet is told."""
        conv = self._registry.get(resource_id) if self._registry is not None else None
        if self._redis is None or self.degraded is not None:
            if conv is not None and self.degraded is not None:
                self._touched_alone.add(resource_id)
            return
        view = conv.view if conv is not None else None
        if view is not None:
            if view.touching:
                view.touch_again = True  # one more when this one is back: a burst, two calls
                return
            view.touching = True
        task = asyncio.get_running_loop().create_task(self._touch(resource_id, view, conv))
        task.add_done_callback(_consume)

    async def _touch(self, resource_id: str, view: View | None, conv: Conversation | None) -> None:
        try:
            while True:
                if view is not None:
                    view.touch_again = False
                body = await self._call(
                    self._scripts["touch"](
                        keys=[self._rec(resource_id)],
                        args=[self.channel, self.replica, resource_id, int(self.retention * 1000)],
                    )
                )
                if view is None or not view.touch_again:
                    break
        except StoreError as exc:
            self.degrade(str(exc))
            self._touched_alone.add(resource_id)
            return
        finally:
            if view is not None:
                view.touching = False
        if conv is not None:
            self._learn_body(conv, body)

    # ------------------------------------------------------------ writes
    def enqueue(self, conv: Conversation, change: Change) -> None:
        view = conv.view
        if self.degraded is not None and view is not None:
            self._changed_alone.add(conv.id)  # merged into the shared copy at recovery
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
            int(snap.status in WATCHED or snap.forwarded_at is not None),
            conv.id,
            int(self.retention * 1000),
            lease,
            self.channel,
            self.replica,
            int(force),
            int(self.lease_ttl * 1000),
            0,  # the outbox lists' bound: none are pushed to unless a push says
        ]

    def _settled(self, conv: Conversation, batch: list[Change]) -> None:
        """A batch of changes done with (written, or nothing to write): off
        the queue, its waiters told, this replica's copy rebased."""
        view = conv.view
        assert view is not None and self._registry is not None
        del view.pending[: len(batch)]
        for change in batch:
            if change.done is not None and not change.done.done():
                change.done.set_result(None)
        self._registry.rebased(conv)

    async def _write(self, conv: Conversation) -> None:
        view = conv.view
        assert view is not None
        while view.pending and self.degraded is None:
            batch = list(view.pending)
            fence = next((c.fence for c in reversed(batch) if c.fence), "")
            base = view.base if view.base is not None else conv.snapshot
            snap = base
            steps = []
            for change in batch:
                steps.append((snap, change.op(snap)))
                snap = steps[-1][1]
            if snap is view.base and not fence:
                # Nothing to change in what Redis has (a merge that found it
                # newer): not written, so not announced to every replica.
                self._settled(conv, batch)
                continue
            keys = [self._rec(conv.id), f"{self.prefix}watch", self._lease(self._key(conv))]
            args = self._write_args(conv, view.rev, snap, fence)
            # The transitions this write makes go into the webhook outbox in the
            # same script: queued once, by whichever replica wrote them.
            push = self.transitions.to_share(conv.id, steps) if self.transitions else None
            if push is not None:
                keys += push.keys
                args[-1] = push.limit
                args += push.entries
            try:
                result = await self._call(self._scripts["write"](keys=keys, args=args))
            except StoreError as exc:
                self.degrade(str(exc))
                if self.transitions is not None:  # alone now: told here, delivered from here
                    for before, after in steps:
                        if after.status != before.status:
                            self.transitions.transitioned(conv.id, before, after)
                break
            outcome = int(result[0])
            if outcome == -1:
                # The lease is another replica's now: this stream's changes are not the truth.
                self.counts["fenced"] += 1
                view.pending = [c for c in view.pending if not c.fence]
                key = self._key(conv)
                self.leases.pop(key, None)
                self.holders.pop(key, None)
                assert self._registry is not None
                self._registry.lease_lost(key)
                continue
            if outcome == 0:
                self.counts["conflicts"] += 1
                record = None
                if len(result) > 2 and result[2] is not None:  # (a nil ends a Lua table)
                    record = self._checked(conv.id, result[1], result[2], None)
                if record is None:
                    # Nothing readable there: the change goes onto what this
                    # replica has, over that revision.
                    view.rev = int(result[1]) if len(result) > 1 else 0
                else:
                    _take(view, record)
                continue
            self.counts["writes"] += 1
            if push is not None and self.transitions is not None:
                self.transitions.shared(push, [int(i) for i in result[2]])
            view.shared(int(result[1]), snap)
            if fence:
                view.holder = self.replica
            self._settled(conv, batch)
        for change in view.pending if self.degraded is not None else ():
            if change.done is not None and not change.done.done():
                change.done.set_result(None)
        if self.degraded is not None:
            if view.pending:
                # Applied here, not written there: merged into the shared
                # copy at recovery, as a change made alone is (forgotten, a
                # step accepted as Redis went away would read as never taken).
                self._changed_alone.add(conv.id)
            view.pending.clear()

    async def written(self, changes: Iterable[asyncio.Future[None]]) -> None:
        """Wait (at most ``store_timeout``) for changes to be in the shared store."""
        waiting = [c for c in changes if not c.done()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await asyncio.gather(*waiting)


class _Refused(Exception):
    """Redis answered, and refused the command (not an outage)."""

    def __init__(self, text: str, for_good: bool) -> None:
        super().__init__(text)
        self.for_good = for_good


def _take(view: View, record: SharedRecord) -> None:
    """A checked shared record made the view's base."""
    view.shared(record.rev, record.snapshot)
    view.holder = record.holder
    view.last_event_id = record.last_event_id


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
