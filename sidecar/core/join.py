"""What a client's own event stream tells it first: the state, to a late joiner.

A client that opens a resource's event stream reads the state of the work
from the stream's first event, in the upstream's vocabulary (gptme's
``connected`` carries ``generating`` and ``pending_tools``). The upstream
may say less than the truth there (gptme 0.35.1 describes the client's own
new session, not the one that works); the sidecar's snapshot says what the
merged GET says. The profile's ``[stream.join]`` (:class:`JoinRules`) says
how the first event is told:

* ``set``: fields of the first event overwritten from the resource's
  snapshot, every other field kept as the upstream sent it;
* ``follow``: events sent right after it, one per resource whose status
  calls for one (opencode's shared ``/event``: a ``session.status`` for each
  session at work). In a ``follow`` event, the string ``{id}`` stands for
  the resource's id, and ``{time_id}`` for a new time-ordered id
  (:func:`time_id`: opencode's events carry one).

Pure but for those ids: bytes and snapshots in, bytes out. :func:`first_event_end` finds where
the first event ends in what has arrived; :func:`tell` rewrites it, or says
it is not the event to rewrite (None: it passes as it came).
"""

from __future__ import annotations

import json
import re
import secrets
import string
import time
from collections.abc import Iterable
from typing import Any

import orjson

from .profile import FollowRule, JoinRules, field_value
from .snapshot import Snapshot
from .sse import EventDecoder

__all__ = ["first_event_end", "tell", "time_id"]

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


def first_event_end(buf: bytes) -> int | None:
    """Where the first event (its blank line included) ends in ``buf``, or
    None while it has not all arrived. A lone CR at the very end may be the
    first half of a CRLF: more is awaited."""
    pos = len(_BOM) if buf.startswith(_BOM) else 0
    for m in _LINE_END.finditer(buf, pos):
        if m.group() == b"\r" and m.end() == len(buf):
            return None
        if m.start() == pos:  # an empty line: the event ends here
            return m.end()
        pos = m.end()
    return None


def tell(
    rules: JoinRules,
    type_field: str,
    block: bytes,
    snap: Snapshot | None,
    known: Iterable[tuple[str, Snapshot]] = (),
) -> bytes | None:
    """The first event ``block`` as the client is told it, or None when it is
    not the profile's ``event`` (or cannot be read): then it passes as it came.

    ``snap``: the resource's snapshot (a stream with ``{id}``; None or an
    unknown status: nothing is set). ``known``: the resources the ``follow``
    rules look at, with their snapshots.
    """
    decoder = EventDecoder(max_event_bytes=len(block) + 1)
    events = decoder.feed(block)
    if len(events) != 1:
        return None
    sse = events[0]
    try:
        # The standard library's parser keeps integers of any size exactly.
        data = json.loads(sse.data)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    event_type = sse.event if type_field == "@event" else field_value(data, type_field)
    if event_type != rules.event:
        return None
    head = block
    if rules.set and snap is not None and snap.status != "unknown":
        values: dict[str, Any] = {
            "generating": snap.generating,
            "pending_tools": [tool for _, tool in snap.pending_tools],
        }
        if snap.last_error is not None:  # an error is said only when one is known
            values["last_error"] = snap.last_error
        changed = False
        for name, path in rules.set.items():
            if name in values:
                changed = _put(data, path, values[name], rules.add_missing) or changed
        if changed:
            rewritten = _with_data(block, data)
            if rewritten is None:
                return None
            head = rewritten
    follow = b"".join(_follow(rules.follow, known))
    if head is block and not follow:
        return None
    return head + follow


def _put(data: dict[str, Any], path: str, value: Any, add: bool) -> bool:
    """Set a dotted path's value (``add``: even where it is missing, its
    parents made); False if it is not set, or already that value."""
    *parents, last = path.split(".")
    holder: Any = data
    for part in parents:
        if not isinstance(holder, dict):
            return False
        holder = holder.setdefault(part, {}) if add else holder.get(part)
    if not isinstance(holder, dict) or (not add and last not in holder):
        return False
    if last in holder and holder[last] == value and type(holder[last]) is type(value):
        return False
    holder[last] = value
    return True


def _with_data(block: bytes, data: dict[str, Any]) -> bytes | None:
    """The event with its data lines replaced by one carrying ``data``; its
    other lines (``event:``, ``id:``, comments) kept in place."""
    try:
        encoded = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    except (UnicodeEncodeError, ValueError):
        return None
    if block.startswith(_BOM):
        block = block[len(_BOM) :]
    lines = _LINE_END.split(block)
    out: list[bytes] = []
    placed = False
    for line in lines:
        if not line:
            continue
        if line == b"data" or line.startswith(b"data:"):
            if not placed:
                out.append(b"data: " + encoded)
                placed = True
            continue
        out.append(line)
    return b"\n".join(out) + b"\n\n"


def _follow(
    rules: tuple[FollowRule, ...], known: Iterable[tuple[str, Snapshot]]
) -> Iterable[bytes]:
    if not rules:
        return
    for resource_id, snap in known:
        for rule in rules:
            if snap.status in rule.when_status:
                event = _fill(rule.event, resource_id)
                yield b"data: " + orjson.dumps(event) + b"\n\n"
                break


def _fill(template: Any, resource_id: str) -> Any:
    if isinstance(template, str):
        filled = template.replace("{id}", resource_id)
        return filled.replace("{time_id}", time_id()) if "{time_id}" in filled else filled
    if isinstance(template, dict):
        return {k: _fill(v, resource_id) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, resource_id) for v in template]
    return template


_BASE62 = string.digits + string.ascii_letters
_last_ms = 0
_counter = 0


def time_id(now: float | None = None) -> str:
    """A new time-ordered id, in the form opencode gives its events' ``id``
    (``evt_`` then this): 12 hex digits of the time (milliseconds times 4096,
    plus a counter within the millisecond, its low 48 bits), then 14 random
    letters and digits."""
    global _last_ms, _counter
    ms = int((time.time() if now is None else now) * 1000)
    if ms != _last_ms:
        _last_ms, _counter = ms, 0
    _counter += 1
    ordered = (ms * 0x1000 + _counter) & 0xFFFF_FFFF_FFFF
    return f"{ordered:012x}" + "".join(secrets.choice(_BASE62) for _ in range(14))
