"""Entity tags: the version in a merged ETag, and which tags are current.

A merged response's tag is ``W/"<upstream tag>;sc=<digest>"`` (the rule is
:func:`sidecar.http.etags.body_digest`). The digest covers the snapshot and a
*version* of the body as the sidecar knows it; a tag is *current* while
neither changed since it was served. Who can judge that:

* **One process**: the version is the conversation's epoch (every change of
  the snapshot or of the body) with a nonce of the process, and the current
  tags are those served in this epoch (``Conversation.served``).
* **A fleet** (a ``redis://`` store, not degraded): the version is the body's
  shared version (``View.body``, bumped in Redis by every content event and
  write of any replica, see :mod:`sidecar.state.fleet`), and the digest is
  ``<12 hex of the snapshot's digest><13 hex of that version>`` followed, when
  the upstream sends no tag, by the body's length. Every replica computes
  the same digest for the same snapshot and body, so a tag served by one is
  current on any other whose snapshot and known version are the same: a
  poller that hops replicas gets its ``304`` and its held long-poll.

Only a version known when the body was asked for may go into its tag: one
learnt after the ask (an event that came while the upstream answered) gives
the tag the version before it, which is stale at once, never current again
(versions only grow). While this replica's own content event waits for its
new version from Redis, the shared rule judges nothing (the tags served in
this epoch still count).
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING

from ..core.snapshot import Snapshot
from ..http import etags

if TYPE_CHECKING:
    from .conversation import Conversation
    from .ports import SharedStore

__all__ = ["Current", "digest"]

_SNAP = 12
_VERSION = 13
_HEX = frozenset("0123456789abcdef")


def _shared(fleet: SharedStore | None, conv: Conversation) -> bool:
    return fleet is not None and fleet.degraded is None and conv.view is not None


def digest(
    fleet: SharedStore | None,
    nonce: str,
    conv: Conversation,
    upstream_tag: str | None,
    snap: Snapshot,
    epoch: int,
    length: int | None,
) -> str:
    """The digest of a body asked for at ``epoch`` and merged with ``snap``."""
    if not _shared(fleet, conv):
        return etags.body_digest(upstream_tag, snap, f"{nonce}{epoch:x}", length)
    view = conv.view
    assert view is not None
    body = view.body if epoch >= view.body_epoch else view.body_before
    head = f"{snap.digest[:_SNAP]}{max(body, 0):0{_VERSION}x}"
    if etags.has_upstream_tag(upstream_tag) or length is None:
        return head
    return f"{head}{length:x}"


class Current(Container[str]):
    """The digests that are current for a conversation now."""

    __slots__ = ("_conv", "_fleet")

    def __init__(self, fleet: SharedStore | None, conv: Conversation) -> None:
        self._fleet = fleet
        self._conv = conv

    def __contains__(self, value: object) -> bool:
        conv = self._conv
        if value in conv.served:
            return True
        if not isinstance(value, str) or not _shared(self._fleet, conv):
            return False
        view = conv.view
        assert view is not None
        if view.touching:
            return False
        head = f"{conv.snapshot.digest[:_SNAP]}{view.body:0{_VERSION}x}"
        return value.startswith(head) and set(value[len(head) :]) <= _HEX
