"""A spec-exact Server-Sent Events decoder: bytes in, events out, no I/O.

It implements "Interpreting an event stream" from the WHATWG HTML standard,
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

The stream is cut into lines on the *bytes* (CRLF, LF or CR; a CR at the end of
one chunk followed by an LF at the start of the next is one line end), and each
line is decoded as UTF-8 with replacement. That is equivalent to decoding the
whole stream first, because CR and LF never occur inside a multi-byte UTF-8
sequence, and it is much cheaper: most lines are ASCII JSON.

The network lives elsewhere (``sidecar.subscription``); a reconnect calls
:meth:`EventDecoder.reset`, which discards a half-received event but keeps the
last event id and the reconnection time, as the spec requires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "EventDecoder", "ServerSentEvent"]

DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``id`` is the stream's last event id at dispatch."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class EventDecoder:
    """Feed it chunks of bytes; it returns the events each chunk completed.

    ``max_event_bytes`` bounds what one event may buffer (its lines together):
    a larger event is dropped whole and counted in :attr:`oversized`, and the
    decoder resynchronises at the next blank line. Memory stays bounded however
    long a line the upstream sends.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        #: The last event id: sent as ``Last-Event-ID`` when reconnecting.
        self.last_event_id = ""
        #: The reconnection time in milliseconds, if the stream set one.
        self.retry: int | None = None
        #: Events dropped because they exceeded ``max_event_bytes``.
        self.oversized = 0
        self._reset_stream()

    def _reset_stream(self) -> None:
        self._pending: list[bytes] = []  # the unfinished line, in pieces
        self._pending_len = 0
        self._at_stream_start = True  # a BOM may still follow
        self._skip_lf = False  # the last chunk ended in CR
        self._discard_line = False  # inside a line too long to keep
        self._reset_event()

    def _reset_event(self) -> None:
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer: str | None = None  # None: no `id` field in this event
        self._event_len = 0
        self._too_big = False

    def reset(self) -> None:
        """Start a new connection: a partial line or event is discarded."""
        self._reset_stream()

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if self._at_stream_start:
            chunk = self._strip_bom(chunk)
            if not chunk:
                return []

        parts = _LINE_END.split(chunk)
        if len(parts) == 1:  # no line end in this chunk
            self._buffer(chunk)
            return []
        if chunk[-1:] == b"\r":
            self._skip_lf = True

        events: list[ServerSentEvent] = []
        first = parts[0]
        if self._discard_line:
            self._discard_line = False  # the overlong line ends here, unread
            event = None
        elif self._pending:
            self._pending.append(first)
            first = b"".join(self._pending)
            self._pending.clear()
            self._pending_len = 0
            event = self._line(first)
        else:
            event = self._line(first)
        if event is not None:
            events.append(event)
        for line in parts[1:-1]:
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._buffer(parts[-1])
        return events

    def _strip_bom(self, chunk: bytes) -> bytes:
        # The BOM may itself arrive split across chunks.
        head = b"".join(self._pending) + chunk if self._pending else chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._pending = [head]
            self._pending_len = len(head)
            return b""
        self._at_stream_start = False
        self._pending.clear()
        self._pending_len = 0
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _buffer(self, piece: bytes) -> None:
        if not piece or self._discard_line:
            return
        if self._pending_len + self._event_len + len(piece) > self.max_event_bytes:
            self._discard_line = True
            self._too_big = True
            self._pending.clear()
            self._pending_len = 0
            return
        self._pending.append(piece)
        self._pending_len += len(piece)

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        if not raw:
            return self._dispatch()
        if self._too_big:
            return None  # skipping the rest of an oversized event
        self._event_len += len(raw)
        if self._event_len > self.max_event_bytes:
            self._too_big = True
            return None
        line = raw.decode("utf-8", "replace")
        colon = line.find(":")
        if colon == 0:
            return None  # a comment
        if colon < 0:
            name, value = line, ""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == " ":
                value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\x00" not in value:
                self._id_buffer = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit():
                self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if self._too_big:
            self.oversized += 1
            self._reset_event()
            return None
        if self._id_buffer is not None:
            # The last event id is updated even when no event is dispatched.
            self.last_event_id = self._id_buffer
        if not self._data:
            self._reset_event()
            return None
        event = ServerSentEvent(
            data="\n".join(self._data),
            event=self._event_type or "message",
            id=self.last_event_id,
            retry=self.retry,
        )
        self._reset_event()
        return event
