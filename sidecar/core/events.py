"""What one upstream event says, read the same way wherever events are read.

The registry (``sidecar.state.registry``) and ``sidecar check`` both turn SSE
events into snapshot changes; this module is the one place that decides what
an event is, so the two cannot drift apart:

* its **data** must be a JSON object, and its **type** a string, found at the
  profile's ``type_field`` (a dotted path into the JSON, or ``@event``: the
  SSE event name). Anything else is *malformed*: counted, never applied;
* its **label** for metrics is the type when the profile names it (a rule or
  a keep-alive), else ``other``: upstream garbage cannot grow a label set;
* on a shared stream (opencode's ``/event``) the **resource** it is about is
  at ``id_field``, and must be a valid id;
* what it lets ``if_seen`` conditions see from now on (:meth:`Reader.seen`),
  whether it is **work** (anything but a keep-alive: evidence that work runs)
  and whether it changes the resource's **content** (the profile's
  ``content_events``).

Then :meth:`Reader.apply` is the reducer's step for it. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import orjson

from . import reducer
from .profile import Profile, field_value
from .snapshot import Snapshot
from .sse import ServerSentEvent

__all__ = ["Event", "Reader"]


@dataclass(frozen=True, slots=True)
class Event:
    """An event of the stream, read: its type, its JSON object, its metric label."""

    type: str
    data: dict[str, Any]
    label: str


class Reader:
    """Reads a profile's events (see the module docstring)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._known = frozenset(profile.events) | profile.keepalive_events

    def read(self, sse: ServerSentEvent) -> Event | None:
        """The event, or None if it is malformed (not a JSON object, no type)."""
        try:
            data = orjson.loads(sse.data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        type_field = self.profile.type_field
        event_type = sse.event if type_field == "@event" else field_value(data, type_field)
        if not isinstance(event_type, str):
            return None
        return Event(event_type, data, event_type if event_type in self._known else "other")

    def resource(self, event: Event) -> str | None:
        """On a shared stream, the resource the event is about (None: none valid)."""
        id_field = self.profile.id_field
        if id_field is None:
            return None
        resource_id = field_value(event.data, id_field)
        if not isinstance(resource_id, str) or not self.profile.valid_id(resource_id):
            return None
        return resource_id

    def seen(self, event: Event) -> list[str]:
        """What this event lets ``if_seen`` conditions see on its connection."""
        return self.profile.seen_tokens(event.type, event.data)

    def is_work(self, event: Event) -> bool:
        """Evidence that work goes on: any event but a keep-alive."""
        return event.type not in self.profile.keepalive_events

    def is_content(self, event: Event) -> bool:
        """The resource's body changed upstream (a held long-poll answers)."""
        return event.type in self.profile.content_events

    def apply(self, snap: Snapshot, event: Event, seen: AbstractSet[str], now: float) -> Snapshot:
        """The snapshot after this event (``snap`` itself if no rule takes it)."""
        rules = self.profile.events.get(event.type)
        if rules is None:
            return snap
        return reducer.reduce_event(snap, rules, event.data, now, seen)

    def changes(self, event: Event) -> bool:
        """Some rule of the profile names this event's type."""
        return event.type in self.profile.events
