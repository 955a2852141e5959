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
import hashlib
import itertools
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
from yarl import URL

from . import reducer
from .config import Settings
from .fleet import Change, RedisStore, View
from .profile import Profile, Trigger
from .snapshot import ACTIVE, Snapshot
from .sse import ServerSentEvent
from .store import MemoryStore, Record, Store
from .subscription import Backoff, Subscription, client_credentials

__all__ = ["Conversation", "Registry"]

log = logging.getLogger("sidecar.registry")

_SHARED = ""  # the subscription key of a profile's single shared stream
TRANSITIONS_KEPT = 20
SERVED_KEPT = 8
AUTHORISED_KEPT = 16
#: Body versions, one sequence for every conversation: a version never
#: repeats, not even for a conversation forgotten and observed again.
_VERSIONS = itertools.count(1)


def _fingerprint(credentials: Mapping[str, str]) -> str:
    """Tells credentials apart without keeping them (they are dropped on refusal)."""
    return hashlib.sha256(repr(sorted(credentials.items())).encode()).hexdigest()


_NO_CREDENTIALS = _fingerprint({})


def client_fingerprint(headers: Mapping[str, str]) -> str:
    """The fingerprint of the credentials a client request carries."""
    if "Authorization" not in headers and "Cookie" not in headers:
        return _NO_CREDENTIALS  # most polls: no hashing
    return _fingerprint(client_credentials(headers))


class Conversation:
    """One observed resource: its snapshot, and a way to wait for changes."""

    __slots__ = (
        "_changed",
        "_persist",
        "authorised",
        "epoch",
        "evidence_timer",
        "id",
        "last_used",
        "last_work_at",
        "served",
        "snapshot",
        "subscription",
        "timer_kind",
        "transitions",
        "version",
        "view",
    )

    def __init__(
        self,
        resource_id: str,
        is_session: bool = False,
        persist: Callable[[Conversation], None] | None = None,
    ) -> None:
        self.id = resource_id
        #: Called when a lasting field changes (the store keeps it).
        self._persist = persist
        self.snapshot = Snapshot(session_id=resource_id if is_session else None)
        self.subscription: Subscription | None = None
        self.last_used = time.monotonic()
        #: When an event of the work itself (not a keep-alive) last arrived.
        self.last_work_at = 0.0
        #: Fails the work unless an event shows it still runs (see Registry).
        self.evidence_timer: asyncio.TimerHandle | None = None
        self.timer_kind = ""
        #: The last state transitions, newest last, for the state API.
        self.transitions: list[dict[str, Any]] = []  # a list: lighter than a deque
        #: Made when someone waits (most conversations never have a waiter).
        self._changed: asyncio.Event | None = None
        #: Bumped by every change of the snapshot or of the body upstream.
        self.epoch = 0
        #: The body upstream as the sidecar knows it: a new number after every
        #: content event and every request that may have written to it (the
        #: response cache reuses a body only while this stays the same).
        self.version = next(_VERSIONS)
        #: Digests of the merged bodies served in this epoch: the ETags that
        #: are still current (a few, for bodies that differ by query).
        self.served: dict[str, None] = {}
        #: Fingerprints of the credentials the upstream last accepted for it.
        self.authorised: dict[str, None] = {}
        #: Its shared copy, with a shared store (see sidecar.fleet).
        self.view: View | None = None

    def authorise(self, fingerprint: str) -> None:
        if fingerprint in self.authorised:
            return  # (its place among the newest matters only when there are many)
        self.authorised[fingerprint] = None
        if len(self.authorised) > AUTHORISED_KEPT:
            del self.authorised[next(iter(self.authorised))]

    def revoke(self, fingerprint: str) -> None:
        """The upstream refused these credentials for it (a 401, a 403...)."""
        self.authorised.pop(fingerprint, None)

    def changed(self) -> None:
        """A change, of the snapshot or of the body upstream: tags served so
        far are stale, and whoever waits is woken."""
        self.epoch += 1
        self.served.clear()
        self.wake_waiters()

    def content_changed(self) -> None:
        """The body upstream changed (a content event, an accepted write)."""
        self.version = next(_VERSIONS)
        self.changed()

    def write_answered(self) -> None:
        """A request that may write to it was answered (any status): a body
        fetched before cannot be reused."""
        self.version = next(_VERSIONS)

    def wake_waiters(self) -> None:
        """Answer held long-polls now (a change, or the sidecar shutting down)."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def remember_served(self, digest: str, epoch: int) -> None:
        """A body was served; its tag is current if nothing changed since
        ``epoch``, when the body was asked for upstream."""
        if epoch != self.epoch:
            return
        if len(self.served) >= SERVED_KEPT:
            del self.served[next(iter(self.served))]
        self.served[digest] = None

    def set(self, snapshot: Snapshot) -> None:
        before = self.snapshot
        if snapshot is before:
            return
        if (snapshot.status, snapshot.stream, snapshot.last_error) != (
            before.status,
            before.stream,
            before.last_error,
        ):
            self.transitions.append(
                {
                    "at": snapshot.as_dict()["updated_at"],
                    "status": snapshot.status,
                    "stream": snapshot.stream,
                    "last_error": snapshot.last_error,
                }
            )
            if len(self.transitions) > TRANSITIONS_KEPT:
                del self.transitions[0]
        self.snapshot = snapshot
        self.changed()
        if self._persist is not None and _lasting(snapshot) != _lasting(before):
            self._persist(self)

    async def wait_changed(self, timeout: float) -> bool:
        """Wait until the snapshot or the resource's body changes; False on timeout."""
        if self._changed is None:
            self._changed = asyncio.Event()
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _stream_now(stream: str) -> Callable[[Snapshot], Snapshot]:
    """The change: the stream is now ``stream``."""
    now = time.time()
    return lambda snap: reducer.stream_changed(snap, stream, now)


def _lasting(snap: Snapshot) -> tuple[Any, ...]:
    """What the store keeps of a snapshot (its stream is of this process only)."""
    return (snap.status, snap.last_error, snap.pending_tools, snap.session_id, snap.retry)


#: Statuses that wait for a human: their conversations are watched again at start.
WAITING = frozenset({"awaiting_tool", "awaiting_input"})


class Registry:
    def __init__(
        self,
        profile: Profile,
        settings: Settings,
        session: aiohttp.ClientSession,
        store: Store | None = None,
    ) -> None:
        self.profile = profile
        self.settings = settings
        self._session = session
        self.store = store if store is not None else MemoryStore()
        #: The shared store, when the sidecar is one of a fleet.
        self.fleet = self.store if isinstance(self.store, RedisStore) else None
        #: Tells this process's ETag versions from another's (epochs restart at 0).
        self.nonce = secrets.token_hex(3)
        self._upstream = URL(settings.upstream)
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._subscriptions: OrderedDict[str, Subscription] = OrderedDict()
        self.stale_after = settings.stale_after or 3 * profile.heartbeat_seconds
        #: Counters for operators: events by type (types the profile does not
        #: name are counted as "other", so upstream garbage cannot grow the
        #: label set), what was skipped, and reconnections.
        self.events_by_type: Counter[str] = Counter()
        self._known_types = set(profile.events) | set(profile.keepalive_events)
        self.malformed_events = 0
        self.oversized_retired = 0
        self.reconnects = 0

    # ------------------------------------------------------------ lookups
    def get(self, resource_id: str) -> Conversation | None:
        return self._conversations.get(resource_id)

    def conversations(self) -> list[Conversation]:
        return list(self._conversations.values())

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    # ----------------------------------------------------------- observing
    def observe(
        self,
        resource_id: str,
        client_headers: Mapping[str, str],
        fingerprint: str | None = None,
    ) -> Conversation:
        """The upstream accepted this client's request for the resource: its
        conversation, authorised for the client (``fingerprint``: its
        credentials', if already known), with its stream opened if needed."""
        conv = self._remember(resource_id)
        conv.authorise(fingerprint or client_fingerprint(client_headers))
        key = self.stream_key(resource_id)
        sub = self._subscriptions.get(key)
        fleet = self.fleet
        if fleet is not None and fleet.degraded is None and key not in fleet.leases:
            # Another replica's stream, or nobody's yet: take the lease if it
            # is free (in the background), and keep these credentials to.
            if sub is not None:
                self._retire(key)  # opened alone while the store was down
            fleet.claim_soon(key, self._credentials(client_headers))
            return conv
        if sub is not None and not sub.finished:
            self._subscriptions.move_to_end(key)
            if conv.snapshot.stream != sub.stream:
                # A shared stream that is live already is live for a
                # resource first seen now, too.
                now, stream = time.time(), sub.stream
                self.update(conv, lambda s: reducer.stream_changed(s, stream, now), sub)
        else:
            credentials = self._credentials(client_headers)
            if sub is not None:
                # Refused earlier (e.g. a 401). Other credentials may be
                # allowed, and the same ones again after a pause: not on every
                # request, or each poll of a refused client would cost an
                # upstream request.
                pause = time.monotonic() - (sub.finished_at or 0.0)
                if (
                    sub.fingerprint == _fingerprint(credentials)
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

    def _credentials(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        if self.settings.upstream_authorization:
            return {"Authorization": self.settings.upstream_authorization}
        return client_credentials(client_headers)

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

    def fetch_soon(self, resource_id: str) -> asyncio.Task[Any] | None:
        """With a shared store, start reading its copy of a resource's snapshot."""
        if self.fleet is None or not self.profile.valid_id(resource_id):
            return None
        return self.fleet.fetch_soon(resource_id)

    async def fetched(self, conv: Conversation, task: asyncio.Task[Any]) -> None:
        assert self.fleet is not None
        await self.fleet.fetched(conv, task)

    async def written(self, done: asyncio.Future[None]) -> None:
        """Wait (at most ``store_timeout``) until the shared store has a change."""
        assert self.fleet is not None
        await self.fleet.written([done])

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
        before = conv.snapshot
        conv.set(op(before))
        fleet = self.fleet
        if fleet is None or conv.snapshot is before or fleet.degraded is not None:
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
    # Work in flight must keep showing evidence. Two timers enforce it: after
    # a step is accepted, some event of it must arrive within start_timeout;
    # after the stream is lost mid-step, it must come back within stale_after
    # and then show an event of the work within confirm_timeout (gptme 0.31.0
    # cannot say whether a step still runs; after a restart it does not).

    def accept_trigger(
        self, conv: Conversation, token: int, trigger: Trigger, body: dict[str, Any]
    ) -> asyncio.Future[None] | None:
        before = conv.snapshot
        now = time.time()
        done = self.update(conv, lambda s: reducer.accept_trigger(s, token, trigger, body, now))
        if conv.snapshot is not before and reducer.is_active(conv.snapshot):
            self._arm_start(conv)
        return done

    def _arm_start(self, conv: Conversation) -> None:
        """Some event of the accepted work must arrive in time (watched by
        whoever holds the stream)."""
        if self.stream_key(conv.id) in self._subscriptions:
            wait = self.settings.start_timeout
            self._arm(
                conv,
                wait,
                "start",
                f"no event from the upstream within {wait:g} s of the step being accepted",
            )

    def _arm(self, conv: Conversation, delay: float, kind: str, reason: str) -> None:
        self._disarm(conv)
        armed_at = time.monotonic()
        conv.timer_kind = kind
        conv.evidence_timer = asyncio.get_running_loop().call_later(
            delay, self._expire, conv, armed_at, reason
        )

    @staticmethod
    def _disarm(conv: Conversation) -> None:
        if conv.evidence_timer is not None:
            conv.evidence_timer.cancel()
            conv.evidence_timer = None
            conv.timer_kind = ""

    def _expire(self, conv: Conversation, armed_at: float, reason: str) -> None:
        conv.evidence_timer = None
        conv.timer_kind = ""
        if conv.last_work_at < armed_at and reducer.is_active(conv.snapshot):
            log.warning(
                "work ended for lack of evidence", extra={"resource": conv.id, "reason": reason}
            )
            now = time.time()
            sub = self._subscriptions.get(self.stream_key(conv.id))
            self.update(conv, lambda s: reducer.fail(s, reason, now), sub)

    def _stream_changed_during_work(self, conv: Conversation, before: str, stream: str) -> None:
        if stream == "lost":
            self._disarm(conv)
            reason = "the event stream was lost mid-step and the upstream refused a new one"
            now = time.time()
            sub = self._subscriptions.get(self.stream_key(conv.id))
            self.update(conv, lambda s: reducer.fail(s, reason, now), sub)
        elif before == "live" and stream in ("reconnecting", "connecting"):
            wait = self.stale_after
            self._arm(
                conv,
                wait,
                "lost",
                f"the event stream was lost mid-step and did not come back within {wait:g} s",
            )
        elif stream == "live" and conv.timer_kind in ("lost", "restart", "takeover"):
            wait = self.settings.confirm_timeout
            what = {
                "lost": "the event stream was lost mid-step; once it was back",
                "restart": "the sidecar restarted mid-step; once its stream was back",
                "takeover": "the replica watching it was lost mid-step; once another's stream"
                " was live",
            }[conv.timer_kind]
            self._arm(
                conv,
                wait,
                "confirm",
                f"{what}, the upstream showed no sign of the step within {wait:g} s",
            )

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
                credentials = self._credentials({})
                sub = self._open(key, credentials, last_event_id=record.last_event_id)
            if sub is None:
                continue
            conv.subscription = sub
            if snap.status in ACTIVE:
                wait = self.stale_after
                self._arm(
                    conv,
                    wait,
                    "restart",
                    f"the sidecar restarted mid-step and the upstream's stream did not come "
                    f"back within {wait:g} s",
                )
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
            if resource_id == newest or reducer.is_active(conv.snapshot):
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
        sub.fingerprint = _fingerprint(credentials)
        if last_event_id:
            sub.decoder.last_event_id = last_event_id  # resumed where the last process was
        self._subscriptions[key] = sub
        sub.start()
        return sub

    def _make_room(self) -> bool:
        """Close the least recently used idle subscription, if there is one."""
        for key in self._subscriptions:  # least recently used first
            conv = self._conversations.get(key)
            if conv is None or not reducer.is_active(conv.snapshot):
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
            if reducer.is_active(conv.snapshot):
                self._stream_changed_during_work(conv, before, stream)
        if stream == "lost" and self.fleet is not None and sub.key in self.fleet.leases:
            # Refused (these credentials): another replica's may be let in.
            asyncio.get_running_loop().create_task(self.fleet.release(sub.key))

    def _on_event(self, sub: Subscription, event: ServerSentEvent) -> None:
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            self.malformed_events += 1
            log.debug("malformed event skipped", extra={"key": sub.key})
            return
        if not isinstance(data, dict):
            self.malformed_events += 1
            return
        profile = self.profile
        if profile.type_field == "@event":
            event_type = event.event
        else:
            event_type = reducer.field_value(data, profile.type_field)
            if not isinstance(event_type, str):
                self.malformed_events += 1
                return
        self.events_by_type[event_type if event_type in self._known_types else "other"] += 1
        sub.seen.update(profile.seen_tokens(event_type, data))
        rules = profile.events.get(event_type)
        if sub.key == _SHARED:
            assert profile.id_field is not None
            resource_id = reducer.field_value(data, profile.id_field)
            if not isinstance(resource_id, str) or not profile.valid_id(resource_id):
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
        self._work_seen(conv, event_type)
        if rules is not None:
            now, seen = time.time(), frozenset(sub.seen)
            self.update(conv, lambda s: reducer.reduce_event(s, rules, data, now, seen), sub)

    def _work_seen(self, conv: Conversation, event_type: str) -> None:
        if event_type in self.profile.content_events:
            conv.content_changed()
            if self.fleet is not None:
                self.fleet.touch(conv.id)  # every replica's long-polls wake
        if event_type not in self.profile.keepalive_events:
            conv.last_work_at = time.monotonic()
            if conv.evidence_timer is not None:
                self._disarm(conv)

    # --------------------------------------------------------------- fleet
    # With a shared store (sidecar.fleet), a replica holds some streams under
    # leases and reads the rest of the fleet's snapshots from Redis.

    def conversations_of(self, key: str) -> list[Conversation]:
        """The conversations whose events come on stream ``key``."""
        if key == _SHARED:
            return self.conversations()
        conv = self.get(key)
        return [conv] if conv is not None else []

    def stream_keys(self) -> list[str]:
        return list(self._subscriptions)

    def own_credentials(self) -> dict[str, str]:
        """What a stream no client asked for is opened with (a takeover, a restore)."""
        return self._credentials({})

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
                wait = self.stale_after
                self._arm(
                    conv,
                    wait,
                    "takeover",
                    "the replica watching it was lost mid-step and no stream came back "
                    f"within {wait:g} s",
                )
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
            self._disarm(conv)
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
            if sub is not None:
                conv.subscription = sub

    def adopt(
        self,
        conv: Conversation,
        base: Snapshot,
        transitions: list[dict[str, Any]],
        last_event_id: str | None,
    ) -> None:
        """Another replica wrote this conversation's shared snapshot."""
        was_active = reducer.is_active(conv.snapshot)
        self.rebased(conv)
        if transitions:
            conv.transitions = list(transitions)[-TRANSITIONS_KEPT:]
        if not was_active and reducer.is_active(conv.snapshot) and conv.evidence_timer is None:
            self._arm_start(conv)  # a step accepted elsewhere, watched here

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
        elif snap.stream == "live" and not self.fleet.alive(view.holder or ""):
            stream = "reconnecting"  # its holder is silent: not believed
        else:
            stream = snap.stream
        if stream != snap.stream:
            snap = dataclasses.replace(snap, stream=stream)
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
            if not fleet.alive(view.holder or ""):
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
            self._disarm(conv)
            conv.subscription = None
            conv.set(reducer.stream_changed(conv.snapshot, "lost", now))
