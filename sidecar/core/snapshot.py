"""The snapshot: what the sidecar knows about one resource, right now.

A :class:`Snapshot` is immutable; the reducer (``sidecar.reducer``) makes a new
one for every change, so a reader never sees a half-applied event, and the
bytes merged into responses are serialised once per change, not per request.

Every state is representable, "don't know" included. What each field and
each status means is said once, in :data:`FIELDS`, :data:`STATUSES` and
:data:`STREAM_STATES` below: the published JSON Schema (``sidecar.core.schema``,
``sidecar schema``) is generated from that table, and the README's table of
fields is checked against it, so a field cannot be added here without being
described there.
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
    "FIELDS",
    "RETRY_KEYS",
    "STATE_KEYS",
    "STATUSES",
    "STATUS_MEANINGS",
    "STREAM_MEANINGS",
    "STREAM_STATES",
    "Field",
    "Snapshot",
    "iso_time",
    "millis",
]

#: Every status, in the order they are documented, with what it means.
STATUS_MEANINGS: dict[str, str] = {
    "unknown": "nothing observed yet (first seen through a GET, or restored after a restart "
    "of the sidecar): never reported as idle",
    "idle": "observed: no work running and none pending",
    "starting": "a trigger was accepted; no event of its work has arrived yet",
    "generating": "the model is producing output",
    "awaiting_tool": "blocked: a tool waits for a human's confirmation",
    "running_tool": "a tool runs",
    "awaiting_input": "blocked: the upstream asked the user for structured input",
    "completed": "the last piece of work finished successfully",
    "failed": "the last piece of work failed; last_error says why",
    "interrupted": "the work was stopped on request",
}
STATUSES = tuple(STATUS_MEANINGS)
#: Statuses in which work is running: ``generating`` is true.
ACTIVE = frozenset({"starting", "generating", "running_tool"})
#: The health of the sidecar's own subscription to the resource's events.
STREAM_MEANINGS: dict[str, str] = {
    "connecting": "never live yet (also right after a restart of the sidecar)",
    "live": "the sidecar is reading the upstream's events",
    "reconnecting": "lost; the sidecar is trying again (what it shows may be out of date)",
    "lost": "given up: the upstream refused the stream",
}
STREAM_STATES = tuple(STREAM_MEANINGS)
#: Fields a rule may reset with ``clear``.
CLEARABLE = ("last_error", "pending_tools", "retry")
#: Fields a ``state`` summary (gptme's ``connected`` event) may carry.
STATE_KEYS = ("generating", "last_error", "pending_tools")
#: The fields of ``retry``, each read from an event field by a rule.
RETRY_KEYS = ("attempt", "message", "next_at")

_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}


@dataclass(frozen=True)
class Field:
    """One field of the merged object: its name, the JSON Schema of its value,
    and what it means (the published schema's description)."""

    name: str
    schema: dict[str, Any]
    meaning: str


#: The merged object's fields, in the order :meth:`Snapshot.as_dict` writes them.
FIELDS: tuple[Field, ...] = (
    Field(
        "id",
        {"type": ["string", "null"]},
        "the session id: the upstream's own if it has one, else the session_id the "
        "client's step used (opencode: the session itself); null when none is known",
    ),
    Field(
        "generating",
        {"type": ["boolean", "null"]},
        "true while work runs (starting, generating, running_tool); null while the status "
        "is unknown (the upstream's own value, if it has one, is left as it is then)",
    ),
    Field(
        "last_error",
        {"type": ["string", "null"]},
        "the error of the last failed step (the upstream's error event's text, or a "
        "trigger's 5xx answer's error)",
    ),
    Field("status", {"enum": list(STATUSES)}, "what the work is doing, as observed"),
    Field(
        "pending_tools",
        {"type": "array", "items": {"type": "object"}},
        "tools waiting for a human, as the upstream described them (gptme's tool_pending "
        "event, opencode's permission.asked properties)",
    ),
    Field(
        "retry",
        {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": list(RETRY_KEYS),
                    "properties": {
                        "attempt": {"type": ["integer", "null"]},
                        "message": {"type": ["string", "null"]},
                        "next_at": _NULLABLE_TIME,
                    },
                    "additionalProperties": False,
                },
            ]
        },
        "while the upstream retries a failed model call (opencode): attempt, message and "
        "next_at (ISO 8601); null otherwise, and cleared when the work ends",
    ),
    Field(
        "updated_at",
        _NULLABLE_TIME,
        "when the sidecar's knowledge last changed (ISO 8601, UTC, milliseconds)",
    ),
    Field(
        "stream",
        {"enum": list(STREAM_STATES)},
        "the sidecar's own subscription to the upstream's events",
    ),
)


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
    #: Wall-clock time of the last of those changes (``updated_at`` moves
    #: with the stream too, and when a replica learns a state): which of two
    #: replicas' states is the newer outcome, after Redis lost both.
    state_at: float | None = None
    #: Wall-clock time a trigger was forwarded upstream whose answer is not
    #: applied yet (a fleet only: written to the shared store before the
    #: request goes out). Never served: it tells a replica taking the stream
    #: over that a step may be running which only a lost replica knew of.
    forwarded_at: float | None = None
    #: The replica that forwarded it (judged only once that one is gone).
    forwarded_by: str | None = None

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
            "state_at": self.state_at,
            "forwarded_at": self.forwarded_at,
            "forwarded_by": self.forwarded_by,
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
            state_at=kept.get("state_at"),
            forwarded_at=kept.get("forwarded_at"),
            forwarded_by=kept.get("forwarded_by"),
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
        """Fields for ``dataclasses.replace`` that every change sets.

        ``updated_at`` never goes back: a change computed earlier (a trigger's
        answer on one replica) applied onto a snapshot written later (another
        replica's event) is dated after it, so that along a
        conversation's history the time only grows, and a reader can tell an
        older state from a newer one by it."""
        at = time.time() if now is None else now
        before = self.updated_at
        if before is not None and millis(at) <= millis(before):
            # In a later millisecond of the time as reported (two changes in
            # the same millisecond would show the same time for two states).
            at = (millis(before) + 1.5) / 1000
        return {"updated_at": at, "version": self.version + 1}


def state_date(snap: Snapshot) -> float:
    """When the work's state last changed (``state_at``; for records of
    older versions, without it: their last change of any kind)."""
    return snap.state_at if snap.state_at is not None else (snap.updated_at or 0.0)


def millis(ts: float) -> int:
    """The millisecond :func:`iso_time` reports for ``ts``."""
    return round(ts * 1_000_000) // 1000


def iso_time(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
