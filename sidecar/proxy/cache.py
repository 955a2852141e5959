"""The event-validated response cache (``cache = "events"``, off by default), and its policy.

A stream-first server reports every change of a conversation as an event,
and the sidecar reads them all: while its stream is live, "nothing changed"
is something it knows. So an enrich GET may be answered from the last
answer the upstream gave for the same target and credentials, merged again
with the current snapshot, as long as:

* that answer was a 200 a shared cache may store (RFC 9111, as
  ``sidecar.proxy.cache_policy`` reads it: no ``no-store``, ``private``,
  ``Set-Cookie`` or ``Vary: *``), for the same key (target, credentials,
  and what else can change the body), and the request's varying headers
  match;
* the resource's stream has been live, on the same connection, since the
  answer was asked for (a reconnect may have lost events);
* the resource's body version has not moved since then: every content event
  (the profile's ``content_events``) and every answered request other than
  GET/HEAD to one of its paths moves it (``Conversation.content_changed``,
  ``Conversation.write_answered``);
* it is younger than ``cache_max_age``, and, if the upstream said
  ``must-revalidate`` or ``proxy-revalidate``, fresh by the upstream's own
  lifetime (else the upstream validates it: a conditional request).

An entry valid by the events but older than ``cache_max_age`` (by less than
``cache_stale_while_revalidate``) is served at once, and asked for again in
the background, once (RFC 5861's stale-while-revalidate): the expiry only
bounds changes made without an event, and no poller waits for it. The
revalidation is a request of the sidecar's own (``Detached``), with the
credentials of the client that found the entry stale, and its result is
counted on its own (``background``).

The baseline (version, connection) is taken *before* the upstream is asked,
so an event that arrives while the answer is on its way makes that answer
unusable at once. Misses for one target that share a baseline wait for one
upstream answer instead of asking again each (``collapsed``). Memory is
bounded by ``cache_max_bytes``, least recently used out; an entry's size
counts its key, headers, bodies and the objects that hold them
(:data:`ENTRY_OVERHEAD`, measured), so the count of entries is bounded too.

Two parts: :class:`ResponseCache` keeps entries, their bytes and the counts;
:class:`Cache` is the policy (which entry may answer which request, how an
answer is kept, what ``Cache-Status`` says), called by the enrich pipeline
(``sidecar.proxy.enrich``) at its first step and at its last.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from ..core.merge import merge
from ..core.snapshot import Snapshot
from ..http.client import UpstreamResponse
from ..http.codings import encode_body
from ..http.errors import UpstreamError
from ..http.etags import etag_digests, merged_etag
from ..http.exchange import Detached, Exchange
from ..http.front import http_date, render_head
from ..http.headers import append_via, relayable_reason
from ..state.conversation import Conversation
from ..state.registry import Registry
from ..state.subscription import Subscription
from . import cache_policy
from .counts import Counts

__all__ = ["Answer", "Baseline", "Cache", "Entry", "Fill", "Merged", "Rendered", "ResponseCache"]

log = logging.getLogger("sidecar.proxy")

#: (request target, credentials fingerprint, the headers of
#: sidecar.proxy.cache_policy.KEY_HEADERS): see cache_policy.key.
Key = tuple[str, ...]
#: An answer as it is to be sent: status, reason, headers, body.
Answer = tuple[int, "str | None", CIMultiDict[str], bytes]
#: An answer with its head rendered (sidecar.http.front.render_head): status, head, body.
Rendered = tuple[int, bytes, bytes]
#: Bytes an entry takes beyond the lengths of its strings and bodies: the
#: entry, its header multidict and tuples, the objects' headers, its place in
#: the LRU map (tracemalloc over 10,000 entries, tests/proxy/test_cache_rfc9111.py).
ENTRY_OVERHEAD = 1024
#: Bytes each header of an entry takes beyond its name's and value's length.
HEADER_OVERHEAD = 170


@dataclass(frozen=True, slots=True)
class Baseline:
    """What must still hold for an answer asked for now to be reused."""

    version: int
    sub: Subscription
    connects: int


@dataclass(slots=True, eq=False)
class Entry:
    key: Key
    baseline: Baseline
    stored_at: float  # monotonic
    status: int
    reason: str | None
    #: The upstream's headers as relayed (hop-by-hop removed), without Via.
    headers: CIMultiDict[str]
    prior_via: tuple[str, ...]
    #: The upstream's body, decoded, and its content coding.
    body: bytes
    encoding: str
    upstream_tag: str | None
    upstream_length: int
    #: Request headers the answer varies on, and their values then.
    vary: tuple[tuple[str, str | None], ...]
    #: The upstream's freshness lifetime (None: it gave none), whether it is
    #: binding (must-revalidate), and the answer's age when it came.
    lifetime: float | None = None
    strict: bool = False
    initial_age: float = 0.0
    #: The last merge of ``body``, for the snapshot it was made with.
    merged_for: Snapshot | None = None
    merged: bytes = b""
    size: int = field(default=0)
    #: The upstream is being asked for it again in the background.
    revalidating: bool = False
    #: The last head rendered for a hit (``Cache._rendered``): for which
    #: snapshot, at which epoch of its conversation, and what else it says,
    #: its ETag's digest, the head.
    head_for: Snapshot | None = None
    head_epoch: int = -1
    head_said: tuple[object, ...] = ()
    head_digest: str = ""
    head: bytes = b""


class ResponseCache:
    """Entries by key, least recently used first, within ``max_bytes``."""

    def __init__(
        self,
        max_age: float,
        max_bytes: int,
        in_key: frozenset[str] = frozenset(),
        stale: float = 0.0,
    ) -> None:
        self.max_age = max_age
        #: Seconds past max_age an entry is served while it is revalidated.
        self.stale = stale
        self.max_bytes = max_bytes
        #: Request headers (lower case) its keys hold (sidecar.proxy.cache_policy.key).
        self.in_key = in_key
        self.bytes = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        #: Upstream answers being fetched, by key: later misses with the same
        #: baseline wait for them.
        self._pending: dict[Key, tuple[Baseline, asyncio.Future[Entry | None]]] = {}
        #: Answers by (result, reason): hit (fresh, stale, collapsed), miss
        #: (absent, expired, content, stream, vary), bypass (why),
        #: revalidated (not_modified, modified), and background revalidations
        #: (background: not_modified, refreshed, not_stored, failed,
        #: superseded).
        self.counts: Counter[tuple[str, str]] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def peek(self, key: Key) -> Entry | None:
        """The entry for ``key``, not counted as a use."""
        return self._entries.get(key)

    def age(self, entry: Entry) -> float:
        """Seconds since the entry was stored (or last validated by the upstream)."""
        return time.monotonic() - entry.stored_at

    @staticmethod
    def current_age(entry: Entry, age: float) -> float:
        """RFC 9111 section 4.2.3: its age when it came, and since."""
        return entry.initial_age + age

    def put(self, entry: Entry) -> bool:
        """Keep ``entry`` (replacing its key's); False if it alone is too large."""
        self.drop(entry.key)
        entry.size = _size(entry)
        if entry.size > self.max_bytes:
            return False
        self._entries[entry.key] = entry
        self.bytes += entry.size
        self._shrink()
        return True

    def _shrink(self) -> None:
        while self.bytes > self.max_bytes and self._entries:
            _, oldest = self._entries.popitem(last=False)
            self.bytes -= oldest.size

    def remerged(self, entry: Entry, snap: Snapshot, merged: bytes) -> None:
        """``entry`` was merged again, with ``snap``: keep that answer."""
        old = entry.size
        entry.merged_for, entry.merged = snap, merged
        entry.size = _size(entry)
        if self._entries.get(entry.key) is entry:
            self.bytes += entry.size - old
            self._shrink()

    def rendered(
        self,
        entry: Entry,
        snap: Snapshot,
        epoch: int,
        said: tuple[object, ...],
        digest: str,
        head: bytes,
    ) -> None:
        """A hit's head was rendered for ``snap`` at ``epoch`` and ``said``: keep it."""
        old = entry.size
        entry.head_for, entry.head_epoch, entry.head_said = snap, epoch, said
        entry.head_digest, entry.head = digest, head
        entry.size = _size(entry)
        if self._entries.get(entry.key) is entry:
            self.bytes += entry.size - old
            self._shrink()

    def drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size

    def refreshed(self, entry: Entry, baseline: Baseline) -> None:
        """The upstream confirmed ``entry`` (a 304 to its validator)."""
        entry.baseline = baseline
        entry.stored_at = time.monotonic()
        entry.initial_age = 0.0
        if self._entries.get(entry.key) is not entry:
            self.put(entry)

    # ------------------------------------------------- collapsed forwarding
    def pending(self, key: Key, baseline: Baseline) -> asyncio.Future[Entry | None] | None:
        """The answer being fetched for ``key`` with the same baseline, if any."""
        found = self._pending.get(key)
        if found is None or found[0] != baseline:
            return None
        return found[1]

    def fetching(self, key: Key, baseline: Baseline) -> asyncio.Future[Entry | None]:
        """This request asks the upstream for ``key``: others may wait for it."""
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = (baseline, future)
        return future

    def fetched(self, key: Key, future: asyncio.Future[Entry | None], entry: Entry | None) -> None:
        """The fetch of ``key`` ended: with an entry to share, or None."""
        if self._pending.get(key, (None, None))[1] is future:
            del self._pending[key]
        if not future.done():
            future.set_result(entry)


def _size(entry: Entry) -> int:
    """What an entry holds, in bytes: its strings' and bodies' lengths, and
    what holds them (ENTRY_OVERHEAD, HEADER_OVERHEAD per header)."""
    headers = sum(len(k) + len(v) + HEADER_OVERHEAD for k, v in entry.headers.items())
    key = sum(len(part) for part in entry.key)
    vary = sum(len(n) + len(v or "") + 100 for n, v in entry.vary)
    tags = len(entry.upstream_tag or "") + len(entry.reason or "") + len(entry.encoding)
    prior = sum(len(v) + 60 for v in entry.prior_via)
    body = len(entry.body) + len(entry.merged) + len(entry.head) + len(entry.head_digest)
    return body + headers + key + vary + tags + prior + ENTRY_OVERHEAD


# ------------------------------------------------------------------ policy


#: RFC 9211's ``fwd`` parameter for each reason of a miss.
_FORWARD = {"absent": "uri-miss", "vary": "vary-miss"}


@dataclass(frozen=True, slots=True)
class Merged:
    """An answer the enrich pipeline merged: what the cache may keep of it."""

    #: The upstream's body, decoded, its content coding and its length as sent.
    decoded: bytes
    encoding: str
    upstream_length: int
    #: The snapshot it was merged with, and the answer (encoded again).
    snap: Snapshot
    out: bytes


class Fill:
    """An enrich GET the cache could not answer: why, and how its answer may
    be kept (taken before the upstream is asked)."""

    __slots__ = (
        "background",
        "baseline",
        "cache",
        "detail",
        "entry",
        "future",
        "fwd",
        "key",
        "store",
        "stored",
    )

    def __init__(
        self,
        cache: ResponseCache,
        key: Key,
        baseline: Baseline | None,
        fwd: str,
        detail: str,
        store: bool,
        entry: Entry | None = None,
    ) -> None:
        self.cache = cache
        self.key = key
        self.baseline = baseline
        self.fwd = fwd
        self.detail = detail
        self.store = store and baseline is not None
        #: An entry the upstream may confirm with a 304 to its validator.
        self.entry = entry
        self.future: asyncio.Future[Entry | None] | None = None
        self.stored: Entry | None = None
        #: A revalidation of the sidecar's own: no client waits for its answer.
        self.background = False

    def validator(self, client_tag: bool) -> str | None:
        """The entry's validator to ask the upstream with (when the client
        sent none of its own)."""
        if client_tag or self.entry is None:
            return None
        return self.entry.upstream_tag or None

    def status(self, stored: bool) -> str:
        """The ``Cache-Status`` of the answer (RFC 9211)."""
        return f"sidecar; fwd={self.fwd}; detail={self.detail}" + ("; stored" if stored else "")

    def keep(
        self,
        upstream: UpstreamResponse,
        exchange: Exchange,
        headers: CIMultiDict[str],
        merged: Merged,
    ) -> bool:
        """Keep a merged 200 if a shared cache may store it (sidecar.proxy.cache_policy)."""
        if not self.store or self.baseline is None:
            return False
        policy = cache_policy.storable(upstream.status, upstream.headers, self.cache.in_key)
        if isinstance(policy, str):
            return False  # (why: cache_policy.storable)
        kept = headers.copy()
        for name in ("Via", "ETag", "Content-Length", "Cache-Status", "Age"):
            kept.popall(name, None)
        entry = Entry(
            key=self.key,
            baseline=self.baseline,
            stored_at=time.monotonic(),
            status=upstream.status,
            reason=relayable_reason(upstream),
            headers=kept,
            prior_via=tuple(upstream.headers.getall("Via", ())),
            body=merged.decoded,
            encoding=merged.encoding,
            upstream_tag=upstream.headers.get("ETag"),
            upstream_length=merged.upstream_length,
            vary=tuple((n, _joined(exchange.headers, n)) for n in policy.vary),
            merged_for=merged.snap,
            merged=merged.out,
            lifetime=policy.lifetime,
            strict=policy.strict,
            initial_age=policy.initial_age,
        )
        if self.cache.put(entry):
            self.stored = entry
        return self.stored is not None

    def done(self) -> None:
        """The upstream was asked (or the request failed): requests waiting
        for this answer get it, or nothing."""
        if self.future is not None:
            self.cache.fetched(self.key, self.future, self.stored)


class Cache:
    """When a kept answer may answer an enrich GET, and how one is kept."""

    def __init__(
        self,
        store: ResponseCache,
        *,
        key: str,
        registry: Registry,
        counts: Counts,
        via: str,
        revalidations: int = 4,
    ):
        """``key``: the profile's merge key; ``registry``: whose tags are
        current; ``revalidations``: background revalidations asked of the
        upstream at once, at most."""
        self.store = store
        self.key = key
        self.registry = registry
        self.counts = counts
        self.via = via
        #: How a stale entry is asked for again in the background (set by the
        #: enrich pipeline, which asks the upstream), and those running or
        #: waiting their turn.
        self.revalidator: Callable[[Exchange, str, Conversation, Fill], Awaitable[None]] | None = (
            None
        )
        self._background: set[asyncio.Task[None]] = set()
        #: Entries stored together expire together: their revalidations take
        #: turns (first come, first asked) rather than reach the upstream
        #: all at once, each entry served stale meanwhile.
        self._turns = asyncio.Semaphore(max(1, revalidations))

    def count(self, result: str, reason: str) -> None:
        self.store.counts[(result, reason)] += 1

    def baseline(self, conv: Conversation | None) -> Baseline | None:
        """What an answer asked for now is valid under, if its resource's
        stream is this process's and live."""
        sub = _live(conv) if conv is not None else None
        if conv is None or sub is None:
            return None
        return Baseline(conv.version, sub, sub.connects)

    def unusable(
        self,
        entry: Entry,
        conv: Conversation,
        exchange: Exchange,
        asked: cache_policy.Asked | None = None,
        validated: bool = False,
    ) -> str | None:
        """Why ``entry`` cannot answer this request now, or None if it can:
        its baseline must be the conversation's now (see :meth:`baseline`,
        read here without making one: this runs on every hit).
        ``validated``: the upstream has just confirmed it (a 304)."""
        cache = self.store
        sub, was = _live(conv), entry.baseline
        if sub is None or sub is not was.sub:
            return "stream"
        if sub.connects != was.connects:
            return "stream"
        if conv.version != was.version:
            return "content"
        for name, value in entry.vary:
            if _joined(exchange.headers, name) != value:
                return "vary"
        if validated:
            return None
        age = cache.age(entry)
        if age >= cache.max_age:
            return "expired"
        current = cache.current_age(entry, age)
        if entry.strict and current >= (entry.lifetime or 0.0):
            # must-revalidate / proxy-revalidate: stale by the upstream's own
            # lifetime, and the upstream alone may say it is still good.
            return "must_revalidate"
        if asked is not None and asked.max_age is not None and current > asked.max_age:
            return "max_age"  # the client wants a younger one (RFC 9111 5.2.1.1)
        return None

    async def lookup(
        self, exchange: Exchange, target: str, conv: Conversation | None, fingerprint: str
    ) -> Fill | None:
        """Answer from the cache if it may; else how to fill it (None: answered)."""
        cache = self.store
        key: Key = cache_policy.key(target, fingerprint, exchange.headers)
        asked = cache_policy.asked(exchange.headers)
        if sum(map(len, key)) > cache_policy.MAX_KEY_BYTES:
            cache.counts[("bypass", "key_too_long")] += 1
            return await self._uncached(exchange, key, asked, "key_too_long")
        baseline = self.baseline(conv)
        if baseline is None or conv is None:
            cache.counts[("bypass", "not_live")] += 1
            return await self._uncached(exchange, key, asked, "not_live")
        store = not asked.no_store
        entry = cache.get(key)
        authorised = fingerprint in conv.authorised
        if asked.no_cache:
            cache.counts[("bypass", "no_cache")] += 1
            return Fill(cache, key, baseline, "request", "no_cache", store, entry)
        if not authorised:
            # The upstream refused these credentials since, or never saw them.
            cache.counts[("bypass", "unauthorised")] += 1
            return await self._uncached(exchange, key, asked, "unauthorised", baseline, store)
        why = "absent" if entry is None else self.unusable(entry, conv, exchange, asked)
        if why is None:
            assert entry is not None
            cache.counts[("hit", "fresh")] += 1
            await self.serve(exchange, conv, entry, self._hit_status(entry))
            return None
        if why == "expired" and entry is not None and self._stale_servable(entry, asked):
            cache.counts[("hit", "stale")] += 1
            if store and not entry.revalidating:
                self._revalidate(exchange, target, conv, key, baseline, entry)
            await self.serve(exchange, conv, entry, self._stale_status(entry))
            return None
        pending = cache.pending(key, baseline)
        if pending is not None:
            # Another request asks the upstream for this answer now, under
            # the same baseline: its answer is as good as a new one.
            shared = await asyncio.shield(pending)
            # Judged now: the stream or the body may have changed meanwhile.
            if shared is not None and self.unusable(shared, conv, exchange, asked) is None:
                cache.counts[("hit", "collapsed")] += 1
                await self.serve(
                    exchange, conv, shared, self._hit_status(shared) + "; detail=collapsed"
                )
                return None
        if asked.only_if_cached:
            await self._not_cached(exchange)
            return None
        cache.counts[("miss", why)] += 1
        fill = Fill(cache, key, baseline, _FORWARD.get(why, "stale"), why, store, entry)
        if store:
            fill.future = cache.fetching(key, baseline)
        return fill

    def _stale_servable(self, entry: Entry, asked: cache_policy.Asked) -> bool:
        """An entry expired by ``cache_max_age`` alone (still valid by the
        events) that may be served while it is revalidated: within the
        bound, not bound by the upstream's own lifetime, and no older than
        the client's ``max-age``."""
        cache = self.store
        age = cache.age(entry)
        if cache.stale <= 0 or age >= cache.max_age + cache.stale:
            return False
        current = cache.current_age(entry, age)
        if entry.strict and current >= (entry.lifetime or 0.0):
            return False
        return asked.max_age is None or current <= asked.max_age

    def _revalidate(
        self,
        exchange: Exchange,
        target: str,
        conv: Conversation,
        key: Key,
        baseline: Baseline,
        entry: Entry,
    ) -> None:
        """Ask the upstream for ``entry`` again, in the background, once."""
        if self.revalidator is None:
            return
        entry.revalidating = True
        fill = Fill(self.store, key, baseline, "stale", "background", True, entry)
        fill.background = True
        task = asyncio.ensure_future(self._in_turn(Detached(exchange), target, conv, fill))
        self._background.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            self._background.discard(done)
            entry.revalidating = False
            fill.done()
            error = None if done.cancelled() else done.exception()
            if error is not None:
                self.count("background", "failed")
                log.warning(
                    "background revalidation failed",
                    extra={"resource": conv.id},
                    exc_info=(type(error), error, error.__traceback__),
                )

        task.add_done_callback(finished)

    async def _in_turn(
        self, exchange: Exchange, target: str, conv: Conversation, fill: Fill
    ) -> None:
        """One background revalidation, once the upstream has a turn for it;
        none if an event, a reconnect or a newer answer overtook the entry
        while it waited (the next poll asks the upstream anyway). Only once
        sent may a poll wait for its answer: one that finds the entry past
        the stale bound while it still waits asks the upstream itself."""
        assert self.revalidator is not None and fill.baseline is not None
        async with self._turns:
            if self.baseline(conv) != fill.baseline or self.store.peek(fill.key) is not fill.entry:
                self.count("background", "superseded")
                return
            fill.future = self.store.fetching(fill.key, fill.baseline)
            await self.revalidator(exchange, target, conv, fill)

    def close(self) -> None:
        """Background revalidations end with the process."""
        for task in list(self._background):
            task.cancel()

    async def _uncached(
        self,
        exchange: Exchange,
        key: Key,
        asked: cache_policy.Asked,
        why: str,
        baseline: Baseline | None = None,
        store: bool = False,
    ) -> Fill | None:
        """A request the cache does not serve: asked upstream, unless the
        client wants only a cached answer (then a 504, RFC 9111 5.2.1.7)."""
        if asked.only_if_cached:
            await self._not_cached(exchange)
            return None
        return Fill(self.store, key, baseline, "bypass", why, store)

    async def _not_cached(self, exchange: Exchange) -> None:
        raise UpstreamError(
            504, "only-if-cached: the cache holds no answer it may give to this request"
        )

    async def confirmed(
        self, exchange: Exchange, conv: Conversation, fill: Fill, upstream: UpstreamResponse
    ) -> bool:
        """The upstream answered ``304`` to the entry's validator: the entry is
        fresh again, and answers if events allow (False: ask for the body)."""
        entry, baseline = fill.entry, fill.baseline
        assert entry is not None and baseline is not None
        upstream.release()
        self.store.refreshed(entry, baseline)
        fill.entry = None
        if fill.background:
            fill.stored = entry
            return True  # no client waits: the entry is fresh again
        self.count("revalidated", "not_modified")
        # Validated by the upstream just now: fresh for this request.
        if self.unusable(entry, conv, exchange, validated=True) is not None:
            return False  # an event came meanwhile
        fill.stored = entry
        await self.serve(exchange, conv, entry, fill.status(stored=True))
        return True

    def hit_now(
        self, exchange: Exchange, target: str, conv: Conversation, fingerprint: str
    ) -> Rendered | None:
        """The answer to a request a fresh entry answers as it is, made at
        once with no wait of any kind (the front door writes it without a
        task of its own), its head rendered (``sidecar.http.front``); None:
        :meth:`lookup` decides, as for any request. The same rules as
        :meth:`lookup`'s first step, and the same counts."""
        cache = self.store
        headers = exchange.headers
        key: Key | None = exchange.derived.get("cache_key")
        if key is None:
            if "Cache-Control" in headers or "Pragma" in headers:
                return None  # the client's directives: lookup reads them
            key = cache_policy.key(target, fingerprint, headers)
            if sum(map(len, key)) > cache_policy.MAX_KEY_BYTES:
                return None
            exchange.derived["cache_key"] = key
        entry = cache.get(key)
        if entry is None or fingerprint not in conv.authorised:
            return None
        if self.unusable(entry, conv, exchange) is not None:
            return None
        cache.counts[("hit", "fresh")] += 1
        if "If-None-Match" in headers:  # perhaps a 304
            status, reason, out, body = self.answer(exchange, conv, entry, self._hit_status(entry))
            return status, render_head(status, reason, out), body
        return self._rendered(exchange, conv, entry)

    def _rendered(self, exchange: Exchange, conv: Conversation, entry: Entry) -> Rendered:
        """A hit's 200, its head rendered once for everything it says: the
        snapshot and the ETag's digest, the age and ttl (whole seconds), the
        second of its ``Date`` (when the upstream gave none). Pollers of one
        conversation within a second share it."""
        cache = self.store
        snap, epoch = conv.snapshot, conv.epoch
        age = cache.age(entry)
        if entry.head_for is snap and entry.head_epoch == epoch and self.registry.tags_fixed:
            digest = entry.head_digest  # the one it was rendered with
        else:
            digest = self.registry.tag_digest(
                conv, entry.upstream_tag, snap, epoch, entry.upstream_length
            )
        said = (
            digest,
            int(cache.current_age(entry, age)),
            int(cache.max_age - age),
            http_date(),
            exchange.version,
        )
        if entry.head_for is not snap or entry.head_said != said:
            self._merge_for(entry, snap)
            headers, digest = self._headers(exchange, conv, entry, self._hit_status(entry))
            headers["Content-Length"] = str(len(entry.merged))
            head = render_head(entry.status, entry.reason, headers)
            cache.rendered(entry, snap, epoch, said, digest, head)
        conv.remember_served(digest, epoch)
        self.counts.count_merge("merged")
        return entry.status, entry.head, entry.merged

    async def serve(
        self, exchange: Exchange, conv: Conversation, entry: Entry, cache_status: str
    ) -> None:
        """Answer with a cached body, merged with the snapshot as it is now."""
        await exchange.respond(*self.answer(exchange, conv, entry, cache_status))

    def answer(
        self, exchange: Exchange, conv: Conversation, entry: Entry, cache_status: str
    ) -> Answer:
        """A cached body merged with the snapshot as it is now (or a 304 if
        the client holds this very answer), as it is to be sent."""
        snap = conv.snapshot
        self._merge_for(entry, snap)
        out = entry.merged
        headers, digest = self._headers(exchange, conv, entry, cache_status)
        conv.remember_served(digest, conv.epoch)
        self.counts.count_merge("merged")
        inm = exchange.headers.get("If-None-Match")
        if inm is not None and digest in etag_digests(inm):
            # The client has this very answer: no content event, no write and
            # no change of the snapshot since it was served.
            headers.popall("Content-Length", None)
            return 304, None, headers, b""
        headers["Content-Length"] = str(len(out))
        return entry.status, entry.reason, headers, out

    def _merge_for(self, entry: Entry, snap: Snapshot) -> None:
        """The entry's body merged with ``snap`` (kept: done once per snapshot)."""
        if entry.merged_for is not snap:
            merged = merge(entry.body, self.key, snap)
            self.store.remerged(entry, snap, encode_body(merged, entry.encoding))

    def _headers(
        self, exchange: Exchange, conv: Conversation, entry: Entry, cache_status: str
    ) -> tuple[CIMultiDict[str], str]:
        """A cached answer's headers as they are now, and its ETag's digest."""
        snap = conv.snapshot
        headers = entry.headers.copy()
        headers["Via"] = append_via(entry.prior_via, exchange.version, self.via)
        epoch = conv.epoch
        digest = self.registry.tag_digest(
            conv, entry.upstream_tag, snap, epoch, entry.upstream_length
        )
        headers["ETag"] = merged_etag(entry.upstream_tag, digest)
        headers["Age"] = str(int(self.store.current_age(entry, self.store.age(entry))))
        headers["Cache-Status"] = cache_status
        return headers, digest

    def _hit_status(self, entry: Entry) -> str:
        ttl = max(0, int(self.store.max_age - self.store.age(entry)))
        return f"sidecar; hit; ttl={ttl}"

    def _stale_status(self, entry: Entry) -> str:
        # RFC 9211: a stale answer's ttl is negative.
        ttl = int(self.store.max_age - self.store.age(entry))
        return f"sidecar; hit; ttl={min(ttl, -1)}; detail=stale-while-revalidate"


def _live(conv: Conversation) -> Subscription | None:
    """The conversation's stream, if it is this process's and live."""
    sub = conv.subscription
    return sub if sub is not None and sub.stream == "live" else None


def _joined(headers: Any, name: str) -> str | None:
    """A request header's field lines as one value (RFC 9110 section 5.3)."""
    values = headers.getall(name, ())
    return ", ".join(values) if values else None
