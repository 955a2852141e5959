"""What the sidecar reads back from its own stores, checked before it is used.

A store is input like any other: an SQLite file another process (or an older
version, or a disk fault) wrote, a Redis hash any client of that Redis can
set, a message anyone may publish on the fleet's channel. Nothing read there
reaches a snapshot, a log line or a request head before this module has
checked it:

* **types and shapes**: a record is a JSON object whose fields have the types
  the sidecar writes; unknown fields are ignored (a newer replica may add
  some during a rolling update);
* **statuses** from the snapshot's table (:data:`sidecar.snapshot.STATUSES`)
  and stream states from :data:`~sidecar.snapshot.STREAM_STATES`;
* **sizes**: ``last_error``, a pending tool, a retry's fields each within
  what one event may carry (``max_event_bytes``); at most
  ``TRANSITIONS_KEPT`` transitions; a whole record within the sum of those;
* **numbers** finite and in range: ``updated_at`` (``state_at``,
  ``forwarded_at``) between the epoch and a day
  from now (a later one would win every comparison of age forever),
  ``version``, ``state_seq`` and revisions between 0 and 2**53;
* **``last_event_id``** header-safe (it is sent as ``Last-Event-ID``): no
  CR, LF or NUL, at most 1 KiB; resource ids and replica names likewise.

A record that fails is rejected with a :class:`Rejected` naming one of
:data:`REASONS` (the label set of ``sidecar_store_rejected_total``). The
caller drops it: the conversation reads ``unknown`` and is observed afresh.
:class:`Rejections` counts them and says so in one warning line each (at
most one line per reason every ``QUIET_SECONDS``, with the count of those not
said, so that a flood of garbage cannot flood the log).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from ..core.snapshot import RETRY_KEYS, STATUSES, STREAM_STATES, Snapshot

__all__ = [
    "MAX_ID",
    "REASONS",
    "Rejected",
    "Rejections",
    "SharedRecord",
    "header_safe",
    "replica_name",
    "resource_id",
    "shared_record",
    "snapshot",
    "transitions",
]

log = logging.getLogger("sidecar.store")

#: Why a record was rejected: the only values of the metric's label.
REASONS = ("unreadable", "shape", "status", "size", "number", "header", "id")
#: Longest resource id, session id, replica name or event id read back, bytes.
MAX_ID = 1024
#: Largest revision, version or sequence number read back (exact in a double).
MAX_COUNT = 2**53
#: How many transitions a record keeps (the registry's TRANSITIONS_KEPT).
MAX_TRANSITIONS = 20
QUIET_SECONDS = 10.0
_UNSAFE = re.compile(r"[\r\n\x00]")
_REPLICA = re.compile(r"[A-Za-z0-9._-]{1,200}")


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Rejections:
    """Rejected records, by reason; each said in one warning line."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({reason: 0 for reason in REASONS})
        self._said: dict[str, float] = {}
        self._unsaid: Counter[str] = Counter()

    def reject(self, where: str, exc: Rejected, what: str | None = None) -> None:
        self.counts[exc.reason] += 1
        now = time.monotonic()
        if now - self._said.get(exc.reason, -QUIET_SECONDS) < QUIET_SECONDS:
            self._unsaid[exc.reason] += 1
            return
        self._said[exc.reason] = now
        extra: dict[str, Any] = {"source": where, "reason": exc.reason, "detail": exc.detail}
        if what is not None:
            extra["record"] = _printable(what)
        if self._unsaid[exc.reason]:
            extra["also_rejected"] = self._unsaid.pop(exc.reason)
        log.warning("record from the store rejected: dropped, observed afresh", extra=extra)


@dataclass(frozen=True)
class SharedRecord:
    """A conversation's record in the shared store, checked."""

    rev: int
    snapshot: Snapshot
    transitions: list[dict[str, Any]]
    holder: str | None
    last_event_id: str | None
    #: The body version (see sidecar.validators): bumped by content events
    #: and writes anywhere in the fleet; 0 when none was recorded.
    body: int = 0


# ------------------------------------------------------------ scalars


def _printable(value: str) -> str:
    """A value for a log line: bounded, control characters escaped."""
    return repr(value[:80])


def header_safe(value: Any, what: str) -> str:
    """A string that may go into a request head (no CR, LF, NUL; bounded)."""
    if not isinstance(value, str):
        raise Rejected("shape", f"{what} is a {type(value).__name__}, not a string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID:
        raise Rejected("size", f"{what} is longer than {MAX_ID} bytes")
    if _UNSAFE.search(value):
        raise Rejected("header", f"{what} holds CR, LF or NUL")
    return value


def resource_id(value: Any) -> str:
    """A resource id read back (bytes or str): UTF-8, header-safe, not empty."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("id", "a resource id is not UTF-8") from None
    try:
        text = header_safe(value, "resource id")
    except Rejected as exc:
        raise Rejected("id", exc.detail) from None
    if not text:
        raise Rejected("id", "an empty resource id")
    return text


def replica_name(value: Any) -> str:
    """A replica's name (host name, pid, random): the characters it is made of."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not _REPLICA.fullmatch(value):
        raise Rejected("shape", "a replica name that no replica would have")
    return value


def _replica(value: Any) -> str | None:
    return None if value is None else replica_name(value)


def count(value: Any, what: str) -> int:
    """A revision, version or sequence number: an integer in [0, 2**53]."""
    if isinstance(value, bytes):
        if not value.isdigit() or len(value) > 16:
            raise Rejected("number", f"{what} is not a whole number")
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Rejected("number", f"{what} is not a whole number")
    if not 0 <= value <= MAX_COUNT:
        raise Rejected("number", f"{what} is out of range")
    return value


def _time(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise Rejected("number", f"{what} is not a number")
    if not math.isfinite(value) or not 0 <= value <= time.time() + 86400:
        raise Rejected("number", f"{what} is not a time between the epoch and tomorrow")
    return float(value)


def _text(value: Any, what: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejected("shape", f"{what} is a {type(value).__name__}, not a string")
    if len(value) > limit or len(value.encode("utf-8", "surrogatepass")) > limit:
        raise Rejected("size", f"{what} is larger than {limit} bytes")
    return value


def _json_size(value: Any, what: str, limit: int) -> None:
    try:
        size = len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):
        raise Rejected("shape", f"{what} is not JSON") from None
    if size > limit:
        raise Rejected("size", f"{what} is larger than {limit} bytes")


# ------------------------------------------------------------ records


def snapshot(kept: Any, limit: int, stream: Any = "connecting") -> Snapshot:
    """The snapshot a store kept (``Snapshot.lasting()``), checked; ``limit``:
    ``max_event_bytes``."""
    if not isinstance(kept, dict):
        raise Rejected("shape", "a snapshot is not an object")
    status = kept.get("status", "unknown")
    if status not in STATUSES:
        raise Rejected("status", f"status {_printable(str(status))} is not one of the table's")
    if stream not in STREAM_STATES:
        raise Rejected("status", f"stream {_printable(str(stream))} is not a stream state")
    raw_tools = kept.get("pending_tools") or []
    if not isinstance(raw_tools, list):
        raise Rejected("shape", "pending_tools is not a list")
    _json_size(raw_tools, "pending_tools", limit)
    tools = []
    for item in raw_tools:
        if not isinstance(item, list) or len(item) != 2:
            raise Rejected("shape", "a pending tool is not an [id, tool] pair")
        tool_id = _text(item[0], "a pending tool's id", MAX_ID)
        if tool_id is None:
            raise Rejected("shape", "a pending tool has no id")
        tools.append((tool_id, item[1]))
    retry = kept.get("retry")
    if retry is not None:
        if not isinstance(retry, dict) or not set(retry) <= set(RETRY_KEYS):
            raise Rejected("shape", "retry is not an object of attempt, message, next_at")
        _json_size(retry, "retry", limit)
        for key, value in retry.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise Rejected("number", f"retry.{key} is not finite")
            if not (value is None or isinstance(value, str | int | float)):
                raise Rejected("shape", f"retry.{key} is not a string or a number")
    session_id = _text(kept.get("session_id"), "session_id", MAX_ID)
    updated_at = _time(kept.get("updated_at"), "updated_at")
    state_at = _time(kept.get("state_at"), "state_at")
    if state_at is not None and (updated_at is None or state_at > updated_at):
        # Every writer dates a state change with the change (updated_at is
        # only ever moved on since): a later one would win every merge.
        raise Rejected("number", "state_at is later than updated_at")
    if state_at is None and status != "unknown":
        # A record of an older version: its state dated by its last change,
        # once, here, before learning it or a stream could move updated_at.
        state_at = updated_at
    return Snapshot(
        status=status,
        last_error=_text(kept.get("last_error"), "last_error", limit),
        pending_tools=tuple(tools),
        session_id=session_id,
        retry=retry,
        stream=stream,
        updated_at=updated_at,
        version=count(kept.get("version") or 0, "version"),
        state_seq=count(kept.get("state_seq") or 0, "state_seq"),
        state_at=state_at,
        forwarded_at=_time(kept.get("forwarded_at"), "forwarded_at"),
        forwarded_by=_replica(kept.get("forwarded_by")),
    )


def transitions(value: Any, limit: int) -> list[dict[str, Any]]:
    """A record's last state transitions, checked (the state API serves them)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TRANSITIONS:
        raise Rejected("shape", f"transitions is not a list of at most {MAX_TRANSITIONS}")
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise Rejected("shape", "a transition is not an object")
        if item.get("status") not in STATUSES or item.get("stream") not in STREAM_STATES:
            raise Rejected("status", "a transition's status or stream is not in the table")
        out.append(
            {
                "at": _text(item.get("at"), "a transition's time", 64),
                "status": item["status"],
                "stream": item["stream"],
                "last_error": _text(item.get("last_error"), "a transition's last_error", limit),
            }
        )
    return out


def _event_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return header_safe(value, "last_event_id")


def record_limit(limit: int) -> int:
    """The largest serialised record: every field at its bound, and some room."""
    return (MAX_TRANSITIONS + 4) * limit + 65536


def shared_record(rev: Any, data: Any, limit: int, body: Any = None) -> SharedRecord:
    """A record of the shared store (a Redis hash's ``rev``, ``data`` and ``body``)."""
    number = count(rev, "rev")
    if number < 1:
        raise Rejected("number", "rev is below 1")
    if not isinstance(data, bytes | str):
        raise Rejected("shape", "data is not a string")
    if len(data) > record_limit(limit):
        raise Rejected("size", f"the record is larger than {record_limit(limit)} bytes")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise Rejected("unreadable", "data is not JSON") from None
    if not isinstance(doc, dict):
        raise Rejected("shape", "data is not an object")
    kept = doc.get("snapshot")
    stream = kept.get("stream", "connecting") if isinstance(kept, dict) else None
    holder = doc.get("holder")
    return SharedRecord(
        rev=number,
        snapshot=snapshot(kept, limit, stream),
        transitions=transitions(doc.get("transitions"), limit),
        holder=None if holder is None else replica_name(holder),
        last_event_id=_event_id(doc.get("last_event_id")),
        body=0 if body is None else count(body, "body"),
    )


def stored_row(blob: Any, limit: int) -> tuple[str, Snapshot, list[dict[str, Any]], str | None]:
    """A row of the SQLite store: (resource id, snapshot, transitions, last event id)."""
    if not isinstance(blob, bytes | str):
        raise Rejected("shape", "the row is not text")
    if len(blob) > record_limit(limit):
        raise Rejected("size", f"the row is larger than {record_limit(limit)} bytes")
    try:
        doc = orjson.loads(blob)
    except orjson.JSONDecodeError:
        raise Rejected("unreadable", "the row is not JSON") from None
    if not isinstance(doc, dict):
        raise Rejected("shape", "the row is not an object")
    return (
        resource_id(doc.get("resource_id")),
        snapshot(doc.get("snapshot"), limit),
        transitions(doc.get("transitions"), limit),
        _event_id(doc.get("last_event_id")),
    )
