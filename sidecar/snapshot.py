"""The snapshot: what the sidecar knows about one resource, right now.

A :class:`Snapshot` is immutable; the reducer (``sidecar.reducer``) makes a new
one for every change, so a reader never sees a half-applied event, and the
bytes merged into responses are serialised once per change, not per request.

Every state is representable, "don't know" included:

============== =============================================================
status         meaning
============== =============================================================
unknown        nothing observed yet (first seen through a GET, or after a
               restart of the sidecar): never reported as "idle"
idle           observed: no work running and none pending
starting       a trigger was accepted, no event of its work has arrived yet
generating     the model is producing output
awaiting_tool  blocked: a tool waits for a human's confirmation
running_tool   a tool runs
awaiting_input blocked: the upstream asked the user for structured input
completed      the last piece of work finished successfully
failed         the last piece of work failed; ``last_error`` says why
interrupted    the work was stopped on request
============== =============================================================

``retry`` is set while the upstream retries a failed model call (opencode's
``session.status`` ``retry``): ``attempt``, ``message`` and ``next_at`` (when
the next attempt is due). Work goes on meanwhile, so ``generating`` stays
true; it is cleared when the work ends.

``stream`` is the health of the sidecar's own subscription: ``connecting``
(never live yet), ``live``, ``reconnecting`` (lost, trying again) or ``lost``
(given up: the upstream refused the stream).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import orjson

__all__ = [
    "ACTIVE",
    "CLEARABLE",
    "RETRY_KEYS",
    "STATE_KEYS",
    "STATUSES",
    "STREAM_STATES",
    "Snapshot",
    "iso_time",
]

STATUSES = (
    "unknown",
    "idle",
    "starting",
    "generating",
    "awaiting_tool",
    "running_tool",
    "awaiting_input",
    "completed",
    "failed",
    "interrupted",
)
#: Statuses in which work is running: ``generating`` is true.
ACTIVE = frozenset({"starting", "generating", "running_tool"})
STREAM_STATES = ("connecting", "live", "reconnecting", "lost")
#: Fields a rule may reset with ``clear``.
CLEARABLE = ("last_error", "pending_tools", "retry")
#: Fields a ``state`` summary (gptme's ``connected`` event) may carry.
STATE_KEYS = ("generating", "last_error", "pending_tools")
#: The fields of ``retry``, each read from an event field by a rule.
RETRY_KEYS = ("attempt", "message", "next_at")


@dataclass(frozen=True)
class Snapshot:
    status: str = "unknown"
    last_error: str | None = None
    #: (tool id, what the upstream said about it), in arrival order.
    pending_tools: tuple[tuple[str, Any], ...] = ()
    #: The client's session id, as reported when the upstream has no field.
    session_id: str | None = None
    #: While the upstream retries: attempt, message, next_at (ISO 8601).
    retry: dict[str, Any] | None = None
    stream: str = "connecting"
    #: Wall-clock time of the last change, seconds since the epoch.
    updated_at: float | None = None
    #: Bumped by every change: what long-polls and ETags follow.
    version: int = 0
    #: Bumped only by changes of the work's state (status, error, tools), so
    #: a trigger's late answer can tell whether events overtook it.
    state_seq: int = 0

    @property
    def generating(self) -> bool | None:
        if self.status == "unknown":
            return None
        return self.status in ACTIVE

    def as_dict(self) -> dict[str, Any]:
        """The object merged into responses under the profile's key."""
        return {
            "id": self.session_id,
            "generating": self.generating,
            "last_error": self.last_error,
            "status": self.status,
            "pending_tools": [tool for _, tool in self.pending_tools],
            "retry": self.retry,
            "updated_at": iso_time(self.updated_at),
            "stream": self.stream,
        }

    def observed(self) -> dict[str, Any]:
        """Only the fields the sidecar vouches for.

        These override the upstream's own values when both exist. While the
        status is unknown the sidecar has not seen ``generating`` or
        ``last_error``, so the upstream's values, if any, are left alone.
        """
        full = self.as_dict()
        if self.session_id is None:
            del full["id"]
        if self.status == "unknown":
            del full["generating"], full["last_error"]
            if not self.pending_tools:
                del full["pending_tools"]
        return full

    def lasting(self) -> dict[str, Any]:
        """What outlives the process (the store keeps it): all but the stream."""
        return {
            "status": self.status,
            "last_error": self.last_error,
            "pending_tools": [list(tool) for tool in self.pending_tools],
            "session_id": self.session_id,
            "retry": self.retry,
            "updated_at": self.updated_at,
            "version": self.version,
            "state_seq": self.state_seq,
        }

    @classmethod
    def restored(cls, kept: dict[str, Any], stream: str | None = None) -> Snapshot:
        """The snapshot :meth:`lasting` kept; its stream is ``connecting`` again
        (or ``stream``: the shared store's holder says how its stream is)."""
        return cls(
            status=str(kept.get("status", "unknown")),
            last_error=kept.get("last_error"),
            pending_tools=tuple((str(k), v) for k, v in kept.get("pending_tools") or ()),
            session_id=kept.get("session_id"),
            retry=kept.get("retry"),
            updated_at=kept.get("updated_at"),
            version=int(kept.get("version") or 0),
            state_seq=int(kept.get("state_seq") or 0),
            stream=stream if stream in STREAM_STATES else "connecting",
        )

    @cached_property
    def body(self) -> bytes:
        """``as_dict()`` serialised once for this snapshot."""
        return orjson.dumps(self.as_dict())

    @cached_property
    def digest(self) -> str:
        """A short content hash: the snapshot's part of a merged ETag."""
        return hashlib.blake2b(self.body, digest_size=8).hexdigest()

    def touched(self, now: float | None = None) -> dict[str, Any]:
        """Fields for ``dataclasses.replace`` that every change sets."""
        return {
            "updated_at": time.time() if now is None else now,
            "version": self.version + 1,
        }


def iso_time(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
