"""A fleet's outbox, in the fleet's Redis: every replica puts, one delivers.

* **Put with the state it reports.** A transition is written by the replica
  whose compare-and-set write of the shared snapshot made it
  (``sidecar.state.fleet``): the entry goes into each receiver's list
  (``{prefix}webhooks:{receiver}``) in the same Lua script as the write, so
  a transition is queued exactly once, whichever replica saw it, and never
  without the state it reports (:meth:`RedisOutbox.share`). The list's bound
  is checked there too; a refused entry is counted by the writer.
* **One replica delivers each receiver**: the one holding its lease
  (``{prefix}webhooks:{receiver}:lease``, set if absent with ``lease_ttl``,
  renewed every third of it). It reads the head of the list, POSTs it, and
  removes it only if it is still the head (a replica that was paused past
  its lease cannot remove an entry it did not deliver). So in steady state
  no transition is sent by two replicas; when a holder dies, the next one
  sends its entry in hand again, with the same ``webhook-id``.
* **Redis down**: transitions this replica sees meanwhile (the fleet then
  runs alone, see ``sidecar.state.fleet``) wait in its memory and are
  delivered by it; when Redis answers again, what is still waiting is put at
  the end of the lists, in order, for the lease holder.

Every entry read back is validated (:meth:`~sidecar.webhooks.outbox.Entry.loads`);
an unreadable one is removed and counted, never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from ..state.ports import OutboxPush
from .outbox import Entry, Outbox

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisOutbox"]

log = logging.getLogger("sidecar.webhooks")

# KEYS: list; ARGV: the entry expected at its head -> 1 removed, 0 not the head
_POP_IF_HEAD = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then redis.call('LPOP', KEYS[1]); return 1 end
return 0
"""
# KEYS: list; ARGV: bound, entries... -> how many were refused (the list was full)
_PUSH_BOUNDED = """
local refused = 0
for i = 2, #ARGV do
  if redis.call('LLEN', KEYS[1]) < tonumber(ARGV[1]) then redis.call('RPUSH', KEYS[1], ARGV[i])
  else refused = refused + 1 end
end
return refused
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: Entries of each list shown by the state API.
SHOWN = 20


class _Unavailable(Exception):
    pass


class RedisOutbox(Outbox):
    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        password: str | None,
        timeout: float,
        lease_ttl: float,
        replica: str,
        receivers: list[str],
        limit: int,
        poll: float = 0.1,
    ) -> None:
        super().__init__(receivers, limit)
        self.url = url
        self.prefix = prefix
        self.password = password
        self.timeout = timeout
        self.lease_ttl = lease_ttl
        self.replica = replica
        self.poll = poll
        self._redis: Redis | None = None
        self._scripts: dict[str, Any] = {}
        #: Lease values held, by receiver: this replica delivers those.
        self.leases: dict[str, str] = {}
        self._lease_seq = 0
        #: Transitions seen while Redis could not be reached, by receiver.
        self._local: dict[str, deque[Entry]] = {r: deque() for r in receivers}
        #: The raw head each receiver's entry in hand was read as (what done removes).
        self._raw: dict[str, bytes] = {}
        #: The first entries of each list, as last read (delivered in turn).
        self._batch: dict[str, deque[bytes]] = {r: deque() for r in receivers}
        #: What the lists held at the last look (the state API and metrics): the
        #: length, and the first entries as read (parsed only when shown).
        self._seen: dict[str, tuple[int, list[bytes]]] = {r: (0, []) for r in receivers}
        self._task: asyncio.Task[None] | None = None

    def key(self, receiver: str) -> str:
        return f"{self.prefix}webhooks:{receiver}"

    def _lease_key(self, receiver: str) -> str:
        return f"{self.prefix}webhooks:{receiver}:lease"

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(
            self.url,
            password=self.password or None,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        for name, text in (
            ("pop", _POP_IF_HEAD),
            ("push", _PUSH_BOUNDED),
            ("renew", _RENEW),
            ("release", _RELEASE),
        ):
            self._scripts[name] = self._redis.register_script(text)
        await self._beat_once()
        self._task = asyncio.get_running_loop().create_task(
            self._beat(), name="sidecar-outbox-beat"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._redis is not None:
            if self.degraded is None:
                for receiver, value in list(self.leases.items()):
                    with contextlib.suppress(_Unavailable):
                        await self._call(
                            self._scripts["release"](keys=[self._lease_key(receiver)], args=[value])
                        )
            self.leases.clear()
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        left = sum(len(q) for q in self._local.values())
        if left:
            log.warning(
                "webhook deliveries lost at shutdown: Redis could not be reached to keep them",
                extra={"count": left},
            )

    async def _call(self, awaitable: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(self.timeout):
                return await awaitable
        except (RedisError, OSError, TimeoutError) as exc:
            why = (
                f"redis did not answer within {self.timeout:g} s"
                if isinstance(exc, TimeoutError)
                else f"redis: {type(exc).__name__}: {exc}"
            )
            self._degrade(why)
            raise _Unavailable(why) from None

    def _degrade(self, why: str) -> None:
        if self.degraded is None:
            self.degraded = why
            self.leases.clear()  # they lapse in Redis
            log.warning(
                "webhook outbox degraded: this replica delivers what it sees itself",
                extra={"reason": why},
            )

    # ------------------------------------------------------------- leases
    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(
                self.lease_ttl / 3 if self.degraded is None else min(1.0, self.lease_ttl / 3)
            )
            try:
                await self._beat_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the heartbeat
                log.exception("webhook outbox heartbeat failed")

    async def _beat_once(self) -> None:
        """Renew or take each receiver's lease; hand back what waited here meanwhile."""
        assert self._redis is not None
        try:
            if self.degraded is not None:
                await self._call(self._redis.ping())
                self.degraded = None
                log.info("webhook outbox back in Redis")
            ttl = int(self.lease_ttl * 1000)
            for receiver in self.receivers:
                await self._hand_back(receiver)
                value = self.leases.get(receiver)
                key = self._lease_key(receiver)
                if value is not None:
                    if not int(
                        await self._call(self._scripts["renew"](keys=[key], args=[value, ttl]))
                    ):
                        del self.leases[receiver]
                        log.warning(
                            "webhook lease lost: another replica delivers",
                            extra={"receiver": receiver},
                        )
                else:
                    self._lease_seq += 1
                    value = f"{self.replica}:{self._lease_seq}"
                    if await self._call(self._redis.set(key, value, nx=True, px=ttl)):
                        self.leases[receiver] = value
                        log.info(
                            "webhook lease taken: this replica delivers",
                            extra={"receiver": receiver},
                        )
                        self.wake(receiver)
                if receiver not in self.leases:
                    await self._look(receiver)
        except _Unavailable:
            pass

    async def _hand_back(self, receiver: str) -> None:
        """What waited in this replica's memory goes to the end of the list, in order."""
        local = self._local[receiver]
        if not local:
            return
        entries = list(local)
        refused = int(
            await self._call(
                self._scripts["push"](
                    keys=[self.key(receiver)], args=[self.limit, *(e.dumps() for e in entries)]
                )
            )
        )
        for _ in entries:
            local.popleft()
        for _ in range(refused):
            self.refused(receiver)

    async def _look(self, receiver: str) -> None:
        """What the list holds (for the state API), read by a replica that does not deliver it."""
        assert self._redis is not None
        length, raws = await self._call(self._both(receiver))
        self._seen[receiver] = (int(length), [bytes(r) for r in raws])

    async def _both(self, receiver: str) -> tuple[Any, Any]:
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=False)
        pipe.llen(self.key(receiver))
        pipe.lrange(self.key(receiver), 0, SHOWN - 1)
        length, raws = await pipe.execute()
        return length, raws

    # -------------------------------------------------------------- verbs
    def share(self, queued: list[tuple[str, Entry]]) -> OutboxPush:
        """What the fleet's write pushes with the state (see the module's text):
        each (receiver, entry), in order."""
        return OutboxPush(
            receivers=[r for r, _ in queued],
            keys=[self.key(r) for r, _ in queued],
            entries=[e.dumps() for _, e in queued],
            limit=self.limit,
        )

    def shared(self, push: OutboxPush, refused: list[int]) -> None:
        """The write that pushed these is in Redis (``refused``: the 1-based
        positions the bound turned away)."""
        turned_away = set(refused)
        for i, receiver in enumerate(push.receivers):
            if i + 1 in turned_away:
                self.refused(receiver)
            else:
                self.wake(receiver)

    def put(self, receiver: str, entry: Entry) -> bool:
        """A transition this replica saw while the shared store was down."""
        local = self._local[receiver]
        if len(local) >= self.limit:
            self.refused(receiver)
            return False
        local.append(entry)
        self.wake(receiver)
        return True

    async def head(self, receiver: str) -> Entry | None:
        local = self._local[receiver]
        if self.degraded is not None:
            return local[0] if local else None
        batch = self._batch[receiver]
        try:
            if local:
                await self._hand_back(receiver)
            if receiver not in self.leases:
                batch.clear()
                return None
            while True:
                if not batch:
                    # The first entries in one read: delivered one by one, each
                    # removed only while it is still the head.
                    length, raws = await self._call(self._both(receiver))
                    self._seen[receiver] = (int(length), [bytes(r) for r in raws])
                    batch.extend(bytes(r) for r in raws)
                    if not batch:
                        return None
                raw = batch[0]
                try:
                    entry = Entry.loads(raw)
                except ValueError as exc:
                    self.invalid(receiver, str(exc))
                    await self._remove(receiver, raw)
                    continue
                self._raw[receiver] = raw
                return entry
        except _Unavailable:
            batch.clear()
            return local[0] if local else None

    async def _remove(self, receiver: str, raw: bytes) -> None:
        """Take ``raw`` off the list if it is still its head; else read the list again."""
        batch = self._batch[receiver]
        removed = int(await self._call(self._scripts["pop"](keys=[self.key(receiver)], args=[raw])))
        if removed and batch and batch[0] == raw:
            batch.popleft()
            length, shown = self._seen[receiver]
            self._seen[receiver] = (max(0, length - 1), shown[1:])
        else:
            batch.clear()  # another replica changed the list: what was read is stale

    async def done(self, receiver: str, entry: Entry) -> None:
        local = self._local[receiver]
        if local and local[0] is entry:
            local.popleft()
            return
        raw = self._raw.pop(receiver, None)
        if raw is None:
            return
        try:
            await self._remove(receiver, raw)
        except _Unavailable:
            self._batch[receiver].clear()

    async def wait(self, receiver: str, timeout: float) -> None:
        # Another replica may put at any time: look again soon, not only when woken.
        await super().wait(receiver, min(timeout, self.poll))

    def pending(self, receiver: str) -> list[Entry]:
        _, shown = self._seen.get(receiver, (0, []))
        return [*_readable(shown), *self._local[receiver]]

    def count(self, receiver: str) -> int:
        length, _ = self._seen.get(receiver, (0, []))
        return length + len(self._local[receiver])

    def delivers(self, receiver: str) -> bool:
        """This replica holds the receiver's lease (or delivers alone: Redis is down)."""
        return receiver in self.leases or self.degraded is not None


def _readable(raws: list[bytes]) -> list[Entry]:
    out = []
    for raw in raws:
        with contextlib.suppress(ValueError):
            out.append(Entry.loads(raw))
    return out
