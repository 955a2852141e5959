"""The event-validated response cache (``cache = "events"``, off by default).

A stream-first server reports every change of a conversation as an event,
and the sidecar reads them all: while its stream is live, "nothing changed"
is something it knows. So an enrich GET may be answered from the last
answer the upstream gave for the same target and credentials, merged again
with the current snapshot, as long as:

* that answer was a 200 the upstream let be stored (no ``no-store``, no
  ``Set-Cookie``, no ``Vary: *``) and the request's varying headers match;
* the resource's stream has been live, on the same connection, since the
  answer was asked for (a reconnect may have lost events);
* the resource's body version has not moved since then: every content event
  (the profile's ``content_events``) and every answered request other than
  GET/HEAD to one of its paths moves it (:meth:`Conversation.content_changed`,
  :meth:`Conversation.write_answered`);
* it is younger than ``cache_max_age``.

The baseline (version, connection) is taken *before* the upstream is asked,
so an event that arrives while the answer is on its way makes that answer
unusable at once. Misses for one target that share a baseline wait for one
upstream answer instead of asking again each (``collapsed``). Memory is
bounded by ``cache_max_bytes``, least recently used out. Which entry is
valid is the proxy's question (:mod:`sidecar.proxy`); this module keeps
entries, their bytes and the counts.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from multidict import CIMultiDict

from .snapshot import Snapshot
from .subscription import Subscription

__all__ = ["Baseline", "Entry", "ResponseCache"]

#: (request target, credentials fingerprint, Accept-Encoding)
Key = tuple[str, str, str]


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
    #: The last merge of ``body``, for the snapshot it was made with.
    merged_for: Snapshot | None = None
    merged: bytes = b""
    size: int = field(default=0)


class ResponseCache:
    """Entries by key, least recently used first, within ``max_bytes``."""

    def __init__(self, max_age: float, max_bytes: int) -> None:
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        #: Upstream answers being fetched, by key: later misses with the same
        #: baseline wait for them.
        self._pending: dict[Key, tuple[Baseline, asyncio.Future[Entry | None]]] = {}
        #: Answers by (result, reason): hit (fresh, collapsed, revalidated),
        #: miss (absent, expired, content, stream, vary), bypass (why).
        self.counts: Counter[tuple[str, str]] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def age(self, entry: Entry) -> float:
        return time.monotonic() - entry.stored_at

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

    def drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size

    def refreshed(self, entry: Entry, baseline: Baseline) -> None:
        """The upstream confirmed ``entry`` (a 304 to its validator)."""
        entry.baseline = baseline
        entry.stored_at = time.monotonic()
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
    headers = sum(len(k) + len(v) for k, v in entry.headers.items())
    return len(entry.body) + len(entry.merged) + headers + 256
