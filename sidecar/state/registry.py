"""The registry: every observed resource's snapshot and its subscription.

It is the one place that owns mutable state. Events from subscriptions and
answers from the proxy come in; the pure reducer computes the next snapshot;
the registry stores it and wakes whoever waits for a change.

Only what the upstream authorised: a resource is observed (its snapshot made,
its stream opened with that client's credentials, or the configured ones)
only after the upstream answered a client's request for it with a 2xx or a
304 (:meth:`Registry.observe`). Each conversation remembers which
credentials (by fingerprint) it was last authorised for, so a long-poll is
held only for them. An unauthenticated flood of new ids costs no upstream
stream and evicts nothing.

Bounds: at most ``max_snapshots`` resources are remembered and at most
``max_subscriptions`` streams are open. The least recently read ones (by an
authorised client) go first, in O(1), but never one with work in flight. A
closed stream keeps its resource's last snapshot (so a ``last_error`` stays
readable) until the snapshot itself is evicted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from ..core import reducer
from ..core.credentials import NO_CREDENTIALS, Credentials
from ..core.events import Reader
from ..core.profile import Profile, Trigger
from ..core.snapshot import ACTIVE, Snapshot, millis
from ..core.sse import ServerSentEvent
from . import validators
from .conversation import TRANSITIONS_KEPT, Change, Conversation, View, lasting
from .evidence import Watches
from .ports import SharedStore, Transitions
from .records import Rejected
from .store import MemoryStore, Record, Store
from .subscription import Backoff, Subscription

__all__ = ["Registry", "RegistrySettings"]

log = logging.getLogger("sidecar.registry")

_SHARED = ""  # the subscription key of a profile's single shared stream


@dataclass(frozen=True)
class RegistrySettings:
    """The options the registry and its subscriptions read: a slice of
    ``sidecar.config.Settings``, which alone has their defaults."""

    upstream: str
    upstream_authorization: str | None
    connect_timeout: float
    stream_head_timeout: float
    #: None: three heartbeats of the profile.
    stale_after: float | None
    start_timeout: float
    confirm_timeout: float
    #: With ``lease_ttl``: how long a forwarded trigger's note is judged.
    response_timeout: float
    lease_ttl: float
    reconnect_min: float
    reconnect_max: float
    max_subscriptions: int
    max_snapshots: int
    max_event_bytes: int


def _stream_now(stream: str) -> Callable[[Snapshot], Snapshot]:
    """The change: the stream is now ``stream``."""
    now = time.time()
    return lambda snap: reducer.stream_changed(snap, stream, now)


#: Statuses that wait for a human: their conversations are watched again at start.
WAITING = frozenset({"awaiting_tool", "awaiting_input"})


class Registry:
    def __init__(
        self,
        profile: Profile,
        settings: RegistrySettings,
        session: aiohttp.ClientSession,
        store: Store | None = None,
        fleet: SharedStore | None = None,
        transitions: Transitions | None = None,
    ) -> None:
        """``fleet``: the shared store, when the sidecar is one of a fleet
        (it is also ``store``; the wiring hands it this registry in turn).
        ``transitions``: who hears of each change of a status made here
        alone (with a fleet, the shared store tells of the ones it writes)."""
        self.profile = profile
        self.settings = settings
        self._session = session
        self.store = store if store is not None else MemoryStore()
        self.fleet = fleet
        self.transitions = transitions
        #: Tells this process's ETag versions from another's (epochs restart at 0).
        self.nonce = secrets.token_hex(3)
        self._upstream = URL(settings.upstream)
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._subscriptions: OrderedDict[str, Subscription] = OrderedDict()
        self.stale_after = settings.stale_after or 3 * profile.heartbeat_seconds
        self._events = Reader(profile)
        self._watches: Watches[Conversation] = Watches(
            start_timeout=settings.start_timeout,
            stale_after=self.stale_after,
            confirm_timeout=settings.confirm_timeout,
            fail=self._no_evidence,
        )
        #: Counters for operators: events by type (types the profile does not
        #: name are counted as "other", so upstream garbage cannot grow the
        #: label set), what was skipped, and reconnections.
        self.events_by_type: Counter[str] = Counter()
        self.malformed_events = 0
        self.oversized_retired = 0
        self.reconnects = 0
        #: When this process began hearing its fleet (a replica not heard yet
        #: is not taken for lost before a lease has passed).
        self._started = time.monotonic()

    # ------------------------------------------------------------ lookups
    def get(self, resource_id: str) -> Conversation | None:
        return self._conversations.get(resource_id)

    def conversations(self) -> list[Conversation]:
        return list(self._conversations.values())

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    def subscription_of(self, resource_id: str) -> Subscription | None:
        """This process's own stream of the resource, if it holds one."""
        key = self.stream_key(resource_id)
        fleet = self.fleet
        if fleet is not None and key not in fleet.leases:
            return None  # another replica's (or nobody's yet)
        return self._subscriptions.get(key)

    # ----------------------------------------------------------- observing
    def observe(
        self, resource_id: str, client: Credentials, authorise: bool = True
    ) -> Conversation:
        """The upstream accepted this client's request for the resource: its
        conversation, authorised for the client's credentials, with its
        stream opened if needed.

        ``authorise=False``: the upstream only listed the resource to this
        client, which does not let it be held or served from the cache."""
        conv = self._remember(resource_id)
        if authorise:
            conv.authorise(client.fingerprint)
        key = self.stream_key(resource_id)
        sub = self._subscriptions.get(key)
        fleet = self.fleet
        if fleet is not None and fleet.degraded is None and key not in fleet.leases:
            # Another replica's stream, or nobody's yet: take the lease if it
            # is free (in the background), and keep these credentials to.
            if sub is not None:
                self._retire(key)  # opened alone while the store was down
            fleet.claim_soon(key, self._credentials(client))
            return conv
        if sub is not None and not sub.finished:
            self._subscriptions.move_to_end(key)
            if conv.snapshot.stream != sub.stream:
                # A shared stream that is live already is live for a
                # resource first seen now, too.
                now, stream = time.time(), sub.stream
                self.update(conv, lambda s: reducer.stream_changed(s, stream, now), sub)
        else:
            credentials = self._credentials(client)
            if sub is not None:
                # Refused earlier (e.g. a 401). Other credentials may be
                # allowed, and the same ones again after a pause: not on every
                # request, or each poll of a refused client would cost an
                # upstream request.
                pause = time.monotonic() - (sub.finished_at or 0.0)
                if (
                    sub.fingerprint == credentials.fingerprint
                    and pause < self.settings.reconnect_max
                ):
                    return conv
                del self._subscriptions[key]
            sub = self._open(key, credentials)
        if sub is not None:
            conv.subscription = sub
        else:
            now = time.time()
            self.update(conv, lambda s: reducer.stream_changed(s, "lost", now))
        return conv

    def _credentials(self, client: Credentials) -> Credentials:
        """What a stream opened for this client authenticates with."""
        if self.settings.upstream_authorization:
            return Credentials([("Authorization", self.settings.upstream_authorization)])
        return client

    async def ensure_live(self, conv: Conversation, timeout: float) -> bool:
        key = self.stream_key(conv.id)
        sub = self._subscriptions.get(key)
        if sub is not None:
            return await sub.wait_live(timeout)
        if self.fleet is None:
            return False
        # Another replica's stream: live when the shared snapshot says so.
        deadline = time.monotonic() + timeout
        while conv.snapshot.stream != "live":
            left = deadline - time.monotonic()
            if left <= 0 or not await conv.wait_changed(left):
                break
        return conv.snapshot.stream == "live"

    # ------------------------------------------------------------- ETags
    @property
    def tags_fixed(self) -> bool:
        """A tag's digest is fixed by its body's snapshot and epoch: true
        alone; in a fleet it moves with the shared view too (validators)."""
        return self.fleet is None

    def tag_digest(
        self,
        conv: Conversation,
        upstream_tag: str | None,
        snap: Snapshot,
        epoch: int,
        length: int | None,
    ) -> str:
        """The digest in the ETag of a body asked for at ``epoch`` (sidecar.validators)."""
        return validators.digest(self.fleet, self.nonce, conv, upstream_tag, snap, epoch, length)

    def current_tags(self, conv: Conversation) -> validators.Current:
        """The digests current for ``conv``: served here since the last
        change, or, in a fleet, computed from the shared state as it is now."""
        return validators.Current(self.fleet, conv)

    def fetch_soon(self, resource_id: str) -> asyncio.Task[Any] | None:
        """With a shared store, start reading its copy of a resource's snapshot."""
        if self.fleet is None or not self.profile.valid_id(resource_id):
            return None
        return self.fleet.fetch_soon(resource_id)

    async def shared_snapshots(self, resource_ids: list[str]) -> dict[str, Snapshot]:
        """With a shared store, the fleet's copies of these resources (one
        round trip): what a list shows of those this replica does not follow."""
        fleet = self.fleet
        if fleet is None or fleet.degraded is not None or not resource_ids:
            return {}
        return await fleet.snapshots(resource_ids)

    async def fetched(self, conv: Conversation, task: asyncio.Task[Any]) -> None:
        assert self.fleet is not None
        await self.fleet.fetched(conv, task)

    async def written(self, done: asyncio.Future[None]) -> None:
        """Wait (at most ``store_timeout``) until the shared store has a change."""
        assert self.fleet is not None
        await self.fleet.written([done])

    def write_answered(self, resource_id: str) -> None:
        """A request that may change the resource's body was answered (any
        status, or none): no body fetched before is reused, here or (through
        the body's shared version) on any replica."""
        conv = self._conversations.get(resource_id)
        if conv is not None:
            conv.write_answered()
            if self.fleet is not None:
                self.fleet.touch(conv.id)

    def valid_id(self, resource_id: str) -> bool:
        return self.profile.valid_id(resource_id)

    def stream_key(self, resource_id: str) -> str:
        """The key of the stream a resource's events come on."""
        return _SHARED if self.profile.shared_stream else resource_id

    def update(
        self,
        conv: Conversation,
        op: Callable[[Snapshot], Snapshot],
        sub: Subscription | None = None,
    ) -> asyncio.Future[None] | None:
        """Apply a change (a reducer step) to a conversation, now; with a
        shared store, also to the shared snapshot (fenced by ``sub``'s lease
        when the change comes from a stream). The future is done when the
        shared store has it (None: nothing to wait for)."""
        fleet = self.fleet
        if (
            fleet is not None
            and sub is not None
            and fleet.degraded is None
            and sub.key in fleet.leases
            and not fleet.holds(sub.key)
        ):
            # Its lease may have lapsed (a pause): acted on once it is renewed.
            fleet.hold_back(sub.key, lambda: self.update(conv, op, sub))
            return None
        before = conv.snapshot
        conv.set(op(before))
        if fleet is None or fleet.degraded is not None:
            # Alone: the transition is this process's to tell (in a fleet,
            # the shared write that makes it tells it, once).
            if self.transitions is not None and conv.snapshot.status != before.status:
                self.transitions.transitioned(conv.id, before, conv.snapshot)
            if fleet is not None and lasting(conv.snapshot) != lasting(before):
                # Noted: merged into the shared copy at recovery. (Not a change
                # of its stream alone: that would only make a stale state look
                # newer than what the fleet learnt meanwhile.)
                fleet.enqueue(conv, Change(op))
            return None
        if conv.snapshot is before:
            return None
        fence = ""
        if sub is not None:
            fence = fleet.leases.get(sub.key, "")
            if not fence:
                return None  # a stream without a lease: its own, while alone
        done = asyncio.get_running_loop().create_future()
        fleet.enqueue(conv, Change(op, fence, done))
        return done

    # ------------------------------------------------------------ evidence
    # Work in flight must keep showing evidence (sidecar.state.evidence).

    def forwarding(
        self, conv: Conversation, trigger: Trigger
    ) -> tuple[float, asyncio.Future[None] | None] | None:
        """A trigger that starts work is about to go upstream. In a fleet, it
        is noted in the shared copy first (``Snapshot.forwarded_at``, by this
        replica; the future: written), so that a replica taking the stream
        over knows of it if this one is lost before the answer. The note's
        time is what :meth:`answered` and :meth:`accept_trigger` clear.
        None: nothing noted (alone, a process lost takes its stream with it
        and a restart judges by status; or the trigger starts no work)."""
        fleet = self.fleet
        if fleet is None or fleet.degraded is not None or not reducer.starts_work(trigger):
            return None
        at, by = time.time(), fleet.replica
        return at, self.update(conv, lambda s: reducer.forwarding(s, at, by))

    def answered(self, conv: Conversation, forwarded: float) -> None:
        """The trigger noted at ``forwarded`` got an answer that changes no
        state (or none at all): its note goes."""
        self.update(conv, lambda s: reducer.answered(s, forwarded))

    def accept_trigger(
        self,
        conv: Conversation,
        token: int,
        trigger: Trigger,
        body: dict[str, Any],
        forwarded: float | None = None,
    ) -> asyncio.Future[None] | None:
        """The upstream accepted the trigger (forwarded, in a fleet, at
        ``forwarded``: its note goes in the same write)."""
        before = conv.snapshot
        now = time.time()

        def accept(snap: Snapshot) -> Snapshot:
            snap = reducer.accept_trigger(snap, token, trigger, body, now)
            return snap if forwarded is None else reducer.answered(snap, forwarded)

        done = self.update(conv, accept)
        if conv.snapshot is not before and reducer.is_active(conv.snapshot):
            self._watch_start(conv)
        return done

    def _in_flight(self, snap: Snapshot) -> bool:
        """Work in flight, or a note of a trigger forwarded young enough to be
        judged: younger than the upstream's ``response_timeout`` and two
        leases, the longest a living forwarder or a takeover takes."""
        if reducer.is_active(snap):
            return True
        at = snap.forwarded_at
        window = self.settings.response_timeout + 2 * self.settings.lease_ttl
        return at is not None and time.time() - at <= window

    def _judge_forwarded(self, conv: Conversation) -> None:
        """A stream this replica holds now, and a note of a trigger forwarded
        whose answer nobody applied: once its forwarder is gone (not heard
        for a lease), the step is watched as work in flight (``forwarded``).
        While the forwarder lives, its answer is its own to apply: asked
        again every heartbeat. A note older than the upstream's
        ``response_timeout`` and two leases (the longest a living forwarder
        or a takeover takes) is dropped, and its record leaves the takeover
        list."""
        fleet = self.fleet
        snap = conv.snapshot
        at = snap.forwarded_at
        sub = self._subscriptions.get(self.stream_key(conv.id))
        if at is None or fleet is None or fleet.degraded is not None or sub is None:
            return  # answered, or not this replica's to judge (any more)
        if reducer.is_active(snap) or conv.evidence.armed:
            return  # watched already
        if not self._in_flight(snap):
            self.answered(conv, at)
        elif snap.forwarded_by is not None and (
            fleet.alive(snap.forwarded_by)
            or time.monotonic() - self._started < self.settings.lease_ttl
        ):
            asyncio.get_running_loop().call_later(
                self.settings.lease_ttl / 3, self._judge_forwarded, conv
            )
        else:
            self._watches.arm(conv, "forwarded", live=sub.stream == "live")

    def _watch_start(self, conv: Conversation) -> None:
        """Some event of the accepted work must arrive in time (watched by
        whoever holds the stream)."""
        if self.stream_key(conv.id) in self._subscriptions:
            self._watches.arm(conv, "start")

    def _no_evidence(self, conv: Conversation, reason: str) -> None:
        log.warning(
            "work ended for lack of evidence", extra={"resource": conv.id, "reason": reason}
        )
        self._fail(conv, reason)

    def _fail(self, conv: Conversation, reason: str) -> None:
        now = time.time()
        sub = self._subscriptions.get(self.stream_key(conv.id))
        self.update(conv, lambda s: reducer.fail(s, reason, now), sub)

    # ------------------------------------------------------------- store
    def _persist(self, conv: Conversation) -> None:
        sub = conv.subscription
        self.store.save(
            Record(
                resource_id=conv.id,
                snapshot=conv.snapshot.lasting(),
                transitions=list(conv.transitions),
                last_event_id=(sub.decoder.last_event_id or None) if sub is not None else None,
            )
        )

    def restore(self) -> int:
        """At start: every kept snapshot, as it was, its stream ``connecting``.

        Work in flight and conversations waiting for a human are watched again
        now, not at their first read (with ``upstream_authorization``, or no
        credentials: a client's are never kept). Work in flight must then show
        an event within ``confirm_timeout`` of its stream being back, or it
        ends failed: ``generating: true`` never outlives the evidence for it.
        """
        records = self.store.load()
        for record in records[-self.settings.max_snapshots :]:
            if not self.profile.valid_id(record.resource_id):
                self.store.rejections.reject(
                    "store", Rejected("id", "not an id of the profile"), record.resource_id
                )
                self.store.forget(record.resource_id)
                continue
            snap = Snapshot.restored(record.snapshot)
            conv = Conversation(record.resource_id, self.profile.id_is_session, self._persist)
            conv.snapshot = snap
            conv.transitions = list(record.transitions)[-TRANSITIONS_KEPT:]
            self._conversations[record.resource_id] = conv
            if snap.status not in ACTIVE and snap.status not in WAITING:
                continue
            key = _SHARED if self.profile.shared_stream else conv.id
            sub = self._subscriptions.get(key)
            if sub is None:
                credentials = self._credentials(NO_CREDENTIALS)
                sub = self._open(key, credentials, last_event_id=record.last_event_id)
            if sub is None:
                continue
            conv.subscription = sub
            if snap.status in ACTIVE:
                self._watches.arm(conv, "restart")
        if records:
            log.info("snapshots restored", extra={"count": len(records), "store": self.store.kind})
        return len(records)

    def _remember(self, resource_id: str, touch: bool = True) -> Conversation:
        """The conversation, made if new; ``touch``: it was just read (LRU)."""
        conv = self._conversations.get(resource_id)
        if conv is None:
            conv = Conversation(resource_id, self.profile.id_is_session, self._persist)
            if self.fleet is not None:
                conv.view = View(base=conv.snapshot)  # revision 0: no shared copy yet
            self._conversations[resource_id] = conv
            self._evict_snapshots()
        elif touch:
            self._conversations.move_to_end(resource_id)
        conv.last_used = time.monotonic()
        return conv

    def _evict_snapshots(self) -> None:
        """Forget the least recently read snapshots beyond the cap, never the
        newest nor one with work in flight (those go to the back of the line:
        each is passed over once, so eviction stays O(1) amortised)."""
        conversations = self._conversations
        newest = next(reversed(conversations), None)
        passed = 0
        while len(conversations) > self.settings.max_snapshots and passed < len(conversations):
            resource_id, conv = next(iter(conversations.items()))
            if resource_id == newest or self._in_flight(conv.snapshot):
                conversations.move_to_end(resource_id)
                passed += 1
                continue
            del conversations[resource_id]
            self._retire(resource_id)
            self.store.forget(resource_id)

    def _open(
        self, key: str, credentials: dict[str, str], last_event_id: str | None = None
    ) -> Subscription | None:
        if len(self._subscriptions) >= self.settings.max_subscriptions and not self._make_room():
            log.warning("subscription cap reached", extra={"cap": self.settings.max_subscriptions})
            return None
        path = self.profile.stream.build(key) if key else self.profile.stream.template
        sub = Subscription(
            key=key,
            url=self._upstream.with_path(self._upstream.path.rstrip("/") + path, encoded=True),
            session=self._session,
            credentials=credentials,
            on_event=self._on_event,
            on_stream=self._on_stream,
            stale_after=self.stale_after,
            connect_timeout=self.settings.connect_timeout,
            head_timeout=self.settings.stream_head_timeout,
            backoff=Backoff(self.settings.reconnect_min, self.settings.reconnect_max),
            max_event_bytes=self.settings.max_event_bytes,
        )
        if last_event_id:
            sub.decoder.last_event_id = last_event_id  # resumed where the last process was
        self._subscriptions[key] = sub
        sub.start()
        return sub

    def _make_room(self) -> bool:
        """Close the least recently used idle subscription, if there is one."""
        for key in self._subscriptions:  # least recently used first
            conv = self._conversations.get(key)
            if conv is None or not self._in_flight(conv.snapshot):
                if conv is not None:
                    self.update(conv, _stream_now("lost"), self._subscriptions[key])
                    conv.subscription = None
                self._retire(key)  # then return: the loop ends with the change
                return True
        return False

    # ------------------------------------------------- from subscriptions
    def _on_stream(self, sub: Subscription, stream: str) -> None:
        if stream == "live" and sub.connects > 1:
            self.reconnects += 1
        now = time.time()
        for conv in self.conversations_of(sub.key):
            before = conv.snapshot.stream
            self.update(conv, lambda s: reducer.stream_changed(s, stream, now), sub)
            snap = conv.snapshot
            if reducer.is_active(snap) or (snap.forwarded_at is not None and conv.evidence.armed):
                failed = self._watches.stream_changed(conv, before, stream)
                if failed is not None:
                    self._fail(conv, failed)
        if stream == "lost" and self.fleet is not None and sub.key in self.fleet.leases:
            # Refused (these credentials): another replica's may be let in.
            asyncio.get_running_loop().create_task(self.fleet.release(sub.key))

    def _on_event(self, sub: Subscription, sse: ServerSentEvent) -> None:
        events = self._events
        event = events.read(sse)
        if event is None:
            self.malformed_events += 1
            log.debug("malformed event skipped", extra={"key": sub.key})
            return
        self.events_by_type[event.label] += 1
        sub.seen.update(events.seen(event))
        if sub.key == _SHARED:
            resource_id = events.resource(event)
            if resource_id is None:
                return
            conv = self._remember(resource_id, touch=False)  # not a read
            conv.subscription = sub
            if conv.snapshot.stream != sub.stream:
                now, stream = time.time(), sub.stream
                self.update(conv, lambda s: reducer.stream_changed(s, stream, now), sub)
        else:
            found = self.get(sub.key)
            if found is None:
                return
            conv = found
        if events.is_content(event):
            conv.content_changed()
            if self.fleet is not None:
                self.fleet.touch(conv.id)  # every replica's long-polls wake
        if events.is_work(event):
            self._watches.work_seen(conv)
        if events.changes(event):
            now, seen = time.time(), frozenset(sub.seen)
            self.update(conv, lambda s: events.apply(s, event, seen, now), sub)

    # --------------------------------------------------------------- fleet
    # With a shared store (sidecar.fleet), a replica holds some streams under
    # leases and reads the rest of the fleet's snapshots from Redis.

    def conversations_of(self, key: str) -> list[Conversation]:
        """The conversations whose events come on stream ``key``."""
        if key == _SHARED:
            return self.conversations()
        conv = self.get(key)
        return [conv] if conv is not None else []

    def watching(self, key: str) -> bool:
        """Whether this replica's own stream ``key`` is open and live."""
        sub = self._subscriptions.get(key)
        return sub is not None and sub.stream == "live"

    def stream_keys(self) -> list[str]:
        return list(self._subscriptions)

    def own_credentials(self) -> Credentials:
        """What a stream no client asked for is opened with (a takeover, a restore)."""
        return self._credentials(NO_CREDENTIALS)

    def remember(self, resource_id: str) -> Conversation:
        return self._remember(resource_id, touch=False)

    def take_over(self, key: str, credentials: dict[str, str], lease: str) -> bool:
        """This replica now holds the lease of stream ``key``: open it.

        Work in flight must show an event within ``confirm_timeout`` of the
        new stream being live (as after a restart), or it ends failed."""
        assert self.fleet is not None
        old = self._subscriptions.get(key)
        if old is not None:
            self._subscriptions.pop(key)
            asyncio.get_running_loop().create_task(old.close())
        last_event_id = None
        convs = self.conversations_of(key)
        for conv in convs:
            if conv.view is not None and conv.view.holder not in (None, self.fleet.replica):
                self.fleet.counts["takeovers"] += 1
                if key:
                    last_event_id = conv.view.last_event_id  # resumed where the holder was
                break
        sub = self._open(key, credentials, last_event_id=last_event_id)
        if sub is None:
            return False
        for conv in convs:
            conv.subscription = sub
            if reducer.is_active(conv.snapshot):
                self._watches.arm(conv, "takeover")
            else:
                self._judge_forwarded(conv)
        log.info("stream taken", extra={"key": key or "*", "lease": lease})
        return True

    def lease_lost(self, key: str, follow: bool = True) -> None:
        """Another replica holds this stream now: close ours, follow the shared
        copy (``follow``: now; else from the next one read)."""
        sub = self._subscriptions.pop(key, None)
        if sub is not None:
            asyncio.get_running_loop().create_task(sub.close())
        for conv in self.conversations_of(key):
            conv.subscription = None
            conv.evidence.cancel()
            if follow:
                self.rebased(conv)

    def fleet_degraded(self) -> None:
        """The shared store is gone: every conversation served here gets its own stream."""
        assert self.fleet is not None
        for conv in self.conversations():
            key = self.stream_key(conv.id)
            if key in self._subscriptions:
                continue
            credentials = self.fleet.standby.get(key)
            if credentials is None and not conv.authorised:
                continue
            sub = self._open(
                key, credentials if credentials is not None else self.own_credentials()
            )
            if sub is None:
                continue
            for watched in self.conversations_of(key):
                watched.subscription = sub
                if reducer.is_active(watched.snapshot) and not watched.evidence.armed:
                    # Its holder's stream is not this replica's to see: the
                    # work in flight must show on this one, as after a takeover
                    # (no replica may be left to end it otherwise).
                    self._watches.arm(watched, "takeover")

    def adopt(
        self,
        conv: Conversation,
        base: Snapshot,
        transitions: list[dict[str, Any]],
        last_event_id: str | None,
    ) -> None:
        """Another replica wrote this conversation's shared snapshot."""
        was_active = reducer.is_active(conv.snapshot)
        noted = conv.snapshot.forwarded_at is not None
        self.rebased(conv)
        if transitions:
            conv.transitions = list(transitions)[-TRANSITIONS_KEPT:]
        if not was_active and reducer.is_active(conv.snapshot):
            if noted or not conv.evidence.armed:
                # A step accepted elsewhere, watched here (its note's watch,
                # if one was armed, gives way: its forwarder did answer).
                self._watch_start(conv)

    def forget_state(self, conv: Conversation, at: float) -> None:
        """The shared record was unusable and is gone (at ``at``): nothing is
        known of the work now (``unknown``) until the holder's stream says again."""
        conv.evidence.cancel()
        self.rebased(conv)
        moved = conv.snapshot.touched(at)  # (after the time it showed: unknown is another state)
        conv.set(
            dataclasses.replace(
                Snapshot(session_id=conv.snapshot.session_id, stream=conv.snapshot.stream),
                **moved,
            )
        )

    def rebased(self, conv: Conversation) -> None:
        """This replica's copy: the shared snapshot, with the changes not written yet."""
        view = conv.view
        if view is None or view.base is None:
            return
        snap = view.base
        for change in view.pending:
            snap = change.op(snap)
        key = self.stream_key(conv.id)
        sub = self._subscriptions.get(key)
        assert self.fleet is not None
        if sub is not None:
            stream = sub.stream
        elif snap.stream == "live" and not self.fleet.believed(view.holder, key):
            stream = "reconnecting"  # its holder is silent: not believed
        else:
            stream = snap.stream
        if stream != snap.stream:
            snap = dataclasses.replace(snap, stream=stream)
        now = conv.snapshot
        if now.updated_at is not None and snap != now:
            # A reader never sees the time of a state go back, on this replica:
            if lasting(snap) == lasting(now):
                # the same state as this replica has, dated a little earlier by
                # the replica that wrote it (each applies an event at its own
                # time): the time this replica showed is kept;
                if (snap.updated_at or 0) < now.updated_at:
                    snap = dataclasses.replace(
                        snap, updated_at=now.updated_at, version=max(snap.version, now.version)
                    )
            elif millis(snap.updated_at or 0) <= millis(now.updated_at):
                # another state, dated earlier than the one this replica
                # showed (a state learnt after this replica knew nothing, or
                # after it went on alone, or woke from a pause, on a stale
                # snapshot it dated since): it is what this replica knows from
                # now on, dated when it learnt it.
                moved = now.touched()
                moved["version"] = max(snap.version, moved["version"])
                snap = dataclasses.replace(snap, **moved)
        if snap != conv.snapshot:
            conv.set(snap)

    def holders_checked(self) -> None:
        """After a heartbeat: streams whose holder fell silent read
        ``reconnecting``, and are claimed by this replica if it can."""
        fleet = self.fleet
        assert fleet is not None
        if fleet.degraded is not None:
            return  # alone: every conversation served here has its own stream
        for conv in self.conversations():
            view = conv.view
            if view is None or view.base is None:
                continue
            key = self.stream_key(conv.id)
            if key in self._subscriptions:
                continue
            if not fleet.believed(view.holder, key):
                self.rebased(conv)
                if fleet.degraded is None:
                    fleet.claim_soon(key, None)

    # ------------------------------------------------------------ closing
    def _retire(self, key: str) -> None:
        """Forget a subscription and close it; its counts stay in the totals."""
        sub = self._subscriptions.pop(key, None)
        if sub is not None:
            self.oversized_retired += sub.decoder.oversized
            if not sub.finished:
                asyncio.get_running_loop().create_task(sub.close())
        if self.fleet is not None and key in self.fleet.leases:
            asyncio.get_running_loop().create_task(self.fleet.release(key))

    @property
    def oversized_events(self) -> int:
        """Events dropped for their size, over all subscriptions ever."""
        return self.oversized_retired + sum(
            s.decoder.oversized for s in self._subscriptions.values()
        )

    async def close(self) -> None:
        subs = list(self._subscriptions.values())
        for key in list(self._subscriptions):
            self._retire(key)
        await asyncio.gather(*(sub.close() for sub in subs), return_exceptions=True)
        now = time.time()
        for conv in self._conversations.values():
            conv.evidence.cancel()
            conv.subscription = None
            conv.set(reducer.stream_changed(conv.snapshot, "lost", now))
