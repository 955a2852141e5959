"""One observed resource: its snapshot, who may see it, and a way to wait for changes.

A :class:`Conversation` is what the registry keeps per resource:

* the **snapshot** (``sidecar.core.snapshot``) and its last transitions;
* the **validators** of its merged answers: ``epoch`` (bumped by every change
  of the snapshot or of the body upstream) and ``served`` (the digests of the
  bodies served in this epoch: the ETags still current); ``version`` (the
  body upstream as the sidecar knows it, which the response cache follows);
* **access**: the fingerprints of the credentials the upstream last accepted
  for it (``authorised``), so a long-poll or a cached answer is only for them;
* its **evidence** (``sidecar.state.evidence``), its **subscription**, and,
  with a shared store, its **view** of the fleet's copy (:class:`View`, with
  the :class:`Change` s not written there yet).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..core.snapshot import Snapshot, state_date
from .evidence import Evidence

if TYPE_CHECKING:
    from .subscription import Subscription

__all__ = ["Change", "Conversation", "Op", "View", "lasting"]

TRANSITIONS_KEPT = 20
SERVED_KEPT = 8
AUTHORISED_KEPT = 16
#: Body versions, one sequence for every conversation: a version never
#: repeats, not even for a conversation forgotten and observed again.
_VERSIONS = itertools.count(1)
#: A change: a reducer step applied to a snapshot.
Op = Callable[[Snapshot], Snapshot]


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
    #: The newest state this replica has seen in the shared copy, read or
    #: written (by ``state_at``): what it writes back when Redis lost its
    #: data, even if it has since adopted an older one (a poll read the first
    #: replica back's record before this replica found the restart).
    known: Snapshot | None = None

    def shared(self, rev: int, base: Snapshot) -> None:
        """The shared copy as read or written: revision and snapshot."""
        self.rev, self.base = rev, base
        if base.status != "unknown" and (
            self.known is None or state_date(base) >= state_date(self.known)
        ):
            self.known = base

    #: The body's shared version as last learnt, the one before it, and the
    #: conversation's epoch when it was learnt (sidecar.state.validators).
    body: int = 0
    body_before: int = -1
    body_epoch: int = 0
    #: A content event or write seen here whose new version Redis has not
    #: returned yet (tags are not judged by the shared version meanwhile).
    touching: bool = False
    touch_again: bool = False


class Conversation:
    """One observed resource: its snapshot, and a way to wait for changes."""

    __slots__ = (
        "_changed",
        "_persist",
        "authorised",
        "epoch",
        "evidence",
        "id",
        "last_used",
        "served",
        "snapshot",
        "subscription",
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
        #: What shows the work in flight still runs (see sidecar.state.evidence).
        self.evidence = Evidence()
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
        #: Its shared copy, with a shared store (see sidecar.state.fleet).
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
        if snapshot.forwarded_at != before.forwarded_at and snapshot == replace(
            before,
            forwarded_at=snapshot.forwarded_at,
            forwarded_by=snapshot.forwarded_by,
            version=snapshot.version,
        ):
            # Only the note of a trigger forwarded (never served): nothing to
            # tell a reader, no tag made stale, no long-poll woken.
            self.snapshot = snapshot
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
        if self._persist is not None and lasting(snapshot) != lasting(before):
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


def lasting(snap: Snapshot) -> tuple[Any, ...]:
    """What the store keeps of a snapshot (its stream is of this process only)."""
    return (snap.status, snap.last_error, snap.pending_tools, snap.session_id, snap.retry)
