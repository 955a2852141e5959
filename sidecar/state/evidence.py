"""Evidence that work in flight still runs: ``generating: true`` never outlives it.

How to think about it: a snapshot that says work is in flight (``starting``,
``generating``, ``running_tool``) is a claim, and every claim needs evidence.
An event of the work (anything but a keep-alive) is evidence. When the
evidence may be missing, one timer per conversation is armed; an event of
the work disarms it; if it runs out first, the work ends ``failed`` with a
``last_error`` that says why. Every rule is a row of :data:`WATCHES`:

=========  ===============================  ===================  ========
watch      armed when                       waits                then
=========  ===============================  ===================  ========
start      a trigger was accepted           ``start_timeout``    failed
lost       the stream dropped mid-step      ``stale_after``      failed
restart    restored mid-step at start       ``stale_after``      failed
takeover   taken over from another replica  ``stale_after``      failed
forwarded  taken over with a trigger whose  ``stale_after``      failed
           forwarder was lost before its
           answer (a fleet only)
confirm    the stream is live again after   ``confirm_timeout``  failed
           lost, restart, takeover or
           forwarded
=========  ===============================  ===================  ========

A stream refused for good (``lost``) while work is in flight fails it at once.

``forwarded`` covers a step only a lost replica knew of: it sent the step
upstream and was killed before the answer, and the step's events went to the
stream it held (gptme 0.31.0 replays none). The note it wrote to the shared
store before forwarding (``Snapshot.forwarded_at``) is the only trace left;
the replica taking the stream over judges it like work in flight, whatever
the status says (the step before's outcome, most often), once the replica
that forwarded it has not been heard for a lease (the registry's
``_judge_forwarded``; a living forwarder applies its own answer).

gptme 0.31.0 cannot say whether a step still runs, and after a restart of
the upstream or of the sidecar nothing says it stopped: only the events
can, so their absence is what ends the claim. No I/O but the event loop's
timers; the registry applies the failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ..core import reducer
from ..core.snapshot import Snapshot

__all__ = ["WATCHES", "Evidence", "Watch", "Watched", "Watches"]


@dataclass(frozen=True)
class Watch:
    """One row: how long the evidence may take, and what its absence means."""

    #: Which of the three waits (``start_timeout``, ``stale_after``, ``confirm_timeout``).
    wait: str
    #: ``last_error`` when it runs out (``{wait}``: the seconds waited).
    reason: str
    #: For a watch that a live stream turns into ``confirm``: what happened.
    before_confirm: str | None = None


WATCHES: dict[str, Watch] = {
    "start": Watch(
        "start_timeout", "no event from the upstream within {wait:g} s of the step being accepted"
    ),
    "lost": Watch(
        "stale_after",
        "the event stream was lost mid-step and did not come back within {wait:g} s",
        "the event stream was lost mid-step; once it was back",
    ),
    "restart": Watch(
        "stale_after",
        "the sidecar restarted mid-step and the upstream's stream did not come back "
        "within {wait:g} s",
        "the sidecar restarted mid-step; once its stream was back",
    ),
    "takeover": Watch(
        "stale_after",
        "the replica watching it was lost mid-step and no stream came back within {wait:g} s",
        "the replica watching it was lost mid-step; once another's stream was live",
    ),
    "forwarded": Watch(
        "stale_after",
        "a replica was lost with a step it had forwarded, before the upstream answered, "
        "and its stream did not come back within {wait:g} s",
        "a replica was lost with a step it had forwarded, before the upstream answered; "
        "once another's stream was live",
    ),
    "confirm": Watch(
        "confirm_timeout", "{before}, the upstream showed no sign of the step within {wait:g} s"
    ),
}
#: ``last_error`` when the stream is refused for good while work is in flight.
REFUSED = "the event stream was lost mid-step and the upstream refused a new one"


class Evidence:
    """A conversation's evidence: when work last showed, and the watch armed."""

    __slots__ = ("kind", "last_work_at", "timer")

    def __init__(self) -> None:
        #: When an event of the work itself (not a keep-alive) last arrived (monotonic).
        self.last_work_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        #: The watch armed ("" when none is).
        self.kind = ""

    @property
    def armed(self) -> bool:
        return self.timer is not None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.kind = ""


class Watched(Protocol):
    """What is watched: a conversation, its evidence and its snapshot."""

    @property
    def evidence(self) -> Evidence: ...
    @property
    def snapshot(self) -> Snapshot: ...


W = TypeVar("W", bound=Watched)


class Watches(Generic[W]):
    """Arms and runs the watches of :data:`WATCHES`; ``fail(conv, reason)``
    ends the work of a conversation whose evidence did not come."""

    def __init__(
        self,
        *,
        start_timeout: float,
        stale_after: float,
        confirm_timeout: float,
        fail: Callable[[W, str], None],
    ) -> None:
        self._waits = {
            "start_timeout": start_timeout,
            "stale_after": stale_after,
            "confirm_timeout": confirm_timeout,
        }
        self._fail = fail

    def arm(self, conv: W, kind: str, live: bool = False) -> None:
        """Watch ``conv`` for evidence, as the row ``kind`` says (``live``:
        its stream is live already, so its ``confirm`` starts now)."""
        before = WATCHES[kind].before_confirm
        if live and before is not None:
            self._arm(conv, "confirm", before=before)
        else:
            self._arm(conv, kind, before="")

    def _arm(self, conv: W, kind: str, before: str) -> None:
        watch = WATCHES[kind]
        wait = self._waits[watch.wait]
        evidence = conv.evidence
        evidence.cancel()
        armed_at = time.monotonic()
        evidence.kind = kind
        reason = watch.reason.format(wait=wait, before=before)
        evidence.timer = asyncio.get_running_loop().call_later(
            wait, self._expire, conv, armed_at, reason
        )

    def work_seen(self, conv: W) -> None:
        """An event of the work itself arrived: evidence."""
        evidence = conv.evidence
        evidence.last_work_at = time.monotonic()
        if evidence.timer is not None:
            evidence.cancel()

    def stream_changed(self, conv: W, before: str, stream: str) -> str | None:
        """The stream of ``conv`` (whose work is in flight) went from
        ``before`` to ``stream``; returns a failure to apply now, if any."""
        evidence = conv.evidence
        if stream == "lost":
            evidence.cancel()
            return REFUSED
        if before == "live" and stream in ("reconnecting", "connecting"):
            self.arm(conv, "lost")
        elif stream == "live":
            then = WATCHES.get(evidence.kind)
            if then is not None and then.before_confirm is not None:
                self._arm(conv, "confirm", before=then.before_confirm)
        return None

    def _expire(self, conv: W, armed_at: float, reason: str) -> None:
        evidence = conv.evidence
        evidence.timer = None
        evidence.kind = ""
        if evidence.last_work_at < armed_at and reducer.in_flight(conv.snapshot):
            self._fail(conv, reason)
