"""The reducer: ``(snapshot, input) -> snapshot``, pure and synchronous.

Theory of operation
-------------------
Three kinds of input change a snapshot, and each has one function here:

* an **event** from the upstream's stream (:func:`reduce_event`): the
  profile lists rules per event type, each with optional conditions (field
  values, the current status, what the stream has carried); the first rule
  that holds applies (:func:`choose`, then :func:`apply_event`), and an
  event no rule takes changes nothing;
* a **trigger's answer** (:func:`accept_trigger`, :func:`fail_trigger`): the
  upstream answered a request that starts or steers work (gptme's
  ``POST .../step``, ``.../tool/confirm``); its rules match the request body;
* the **stream's health** (:func:`stream_changed`), reported by the
  subscription that feeds the events, and the loss of evidence
  (:func:`fail`): work that shows no event, or whose stream was lost and
  whose upstream cannot confirm it still runs, ends as failed with a
  ``last_error`` that says why. ``generating: true`` never outlives the
  evidence for it.

Events are the truth; a trigger's answer is only a hint that may arrive late.
So before forwarding a trigger the proxy takes :func:`trigger_token` (the
snapshot's ``state_seq``), and the answer is applied only if no event changed
the state since: gptme 0.35.1 can finish a whole step before ``/step``
answers, and that answer must not turn "completed" back into "starting". A
rejected trigger (4xx) changes nothing, so the previous state stands. In a
fleet, a trigger is also noted as forwarded (:func:`forwarding`) before it
goes out, and the note cleared by its answer (:func:`answered`) or by any new
state: a note left behind means the replica that forwarded it was lost
before the answer (:func:`in_flight`).

Nothing here does I/O or reads a clock it was not given: every function is
deterministic and testable in microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import Any, TypeGuard

from .profile import EventRule, Trigger, field_value
from .snapshot import ACTIVE, STREAM_STATES, Snapshot, iso_time

__all__ = [
    "accept_trigger",
    "answered",
    "apply_event",
    "choose",
    "fail",
    "fail_trigger",
    "field_value",
    "forwarding",
    "in_flight",
    "is_active",
    "learn_session",
    "reduce_event",
    "starts_work",
    "stream_changed",
    "trigger_token",
]


def choose(
    rules: Sequence[EventRule],
    snap: Snapshot,
    fields: dict[str, Any],
    seen: AbstractSet[str] = frozenset(),
) -> EventRule | None:
    """The first rule whose conditions hold, or None: the event changes nothing."""
    for rule in rules:
        if rule.when_status is not None and snap.status not in rule.when_status:
            continue
        if rule.unless_status is not None and snap.status in rule.unless_status:
            continue
        if rule.if_seen is not None and rule.if_seen.isdisjoint(seen):
            continue
        if not _matches(rule, fields):
            continue
        return rule
    return None


def _matches(rule: EventRule, fields: dict[str, Any]) -> bool:
    return all(_equals_one(field_value(fields, path), values) for path, values in rule.match)


def _equals_one(value: Any, values: tuple[Any, ...]) -> bool:
    return any(_same(value, v) for v in values)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # TOML's `true` matches JSON's `true`, never 1
    return bool(a == b)


def reduce_event(
    snap: Snapshot,
    rules: Sequence[EventRule],
    event: dict[str, Any],
    now: float,
    seen: AbstractSet[str] = frozenset(),
) -> Snapshot:
    """Apply the first of an event type's rules that holds; ``snap`` if none."""
    rule = choose(rules, snap, event, seen)
    return snap if rule is None else apply_event(snap, rule, event, now)


def apply_event(snap: Snapshot, rule: EventRule, event: dict[str, Any], now: float) -> Snapshot:
    """Apply one rule's effects. Returns ``snap`` itself when nothing changed."""
    status = snap.status
    last_error = snap.last_error
    tools = snap.pending_tools
    retry = snap.retry

    if rule.state is not None:
        status, last_error, tools = _from_state_summary(snap, rule.state, event)
    if "last_error" in rule.clear:
        last_error = None
    if "pending_tools" in rule.clear:
        tools = ()
    if "retry" in rule.clear:
        retry = None
    if rule.status is not None:
        status = rule.status
    if rule.last_error is not None:
        value = field_value(event, rule.last_error)
        last_error = _as_error(value) if value is not None else "unspecified error"
    if rule.retry is not None:
        retry = _retry(rule.retry, event)
    tools = _pending(rule, tools, event)
    if tools and status in ("idle", "completed"):
        status = "awaiting_tool"  # a tool still waits, whatever else finished
    if status not in ACTIVE:
        retry = None  # a retry belongs to work in flight

    if (status, last_error, tools, retry) == (
        snap.status,
        snap.last_error,
        snap.pending_tools,
        snap.retry,
    ):
        return snap
    moved = snap.touched(now)
    return replace(
        snap,
        status=status,
        last_error=last_error,
        pending_tools=tools,
        retry=retry,
        state_seq=snap.state_seq + 1,
        state_at=moved["updated_at"],
        forwarded_at=None,  # a new state: no step left unaccounted for
        forwarded_by=None,
        **moved,
    )


def _pending(
    rule: EventRule, tools: tuple[tuple[str, Any], ...], event: dict[str, Any]
) -> tuple[tuple[str, Any], ...]:
    if rule.add_pending is not None:
        tool_id = field_value(event, rule.add_pending)
        if tool_id is not None:
            # What is reported is the object that carries the id: gptme's
            # event itself (less its type), opencode's ``properties``.
            parent, _, _ = rule.add_pending.rpartition(".")
            holder = field_value(event, parent) if parent else event
            info = {k: v for k, v in holder.items() if k != "type" or parent}
            tools = (*((k, v) for k, v in tools if k != str(tool_id)), (str(tool_id), info))
    if rule.remove_pending is not None:
        tool_id = field_value(event, rule.remove_pending)
        tools = tuple((k, v) for k, v in tools if k != str(tool_id))
    return tools


def _retry(fields: dict[str, str], event: dict[str, Any]) -> dict[str, Any]:
    """The retry's fields, of the types the published schema gives them: a
    value of another type is not shown as if it were one (it reads null)."""
    out: dict[str, Any] = {name: field_value(event, path) for name, path in fields.items()}
    attempt, message, due = out.get("attempt"), out.get("message"), out.get("next_at")
    next_at: Any = due
    if _is_number(due):
        # Epoch seconds or milliseconds (opencode sends ms): ISO 8601, as
        # every other time the sidecar reports.
        try:
            next_at = iso_time(due / 1000 if due > 1e11 else due)
        except (OverflowError, OSError, ValueError):
            next_at = None  # no calendar has that day
    return {
        "attempt": int(attempt) if _is_number(attempt) and attempt == int(attempt) else None,
        "message": message if isinstance(message, str) else None,
        "next_at": next_at if isinstance(next_at, str) else None,
    }


def _is_number(value: object) -> TypeGuard[int | float]:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _from_state_summary(
    snap: Snapshot, fields: dict[str, str], event: dict[str, Any]
) -> tuple[str, str | None, tuple[tuple[str, Any], ...]]:
    """Read a summary such as gptme 0.35.1's ``connected`` event.

    Only positive evidence counts: "generating", an error or a pending tool is
    a fact about the conversation, while "not generating" may only describe a
    brand-new observer session, so it leaves the status as it was.
    """
    status, last_error, tools = snap.status, snap.last_error, snap.pending_tools
    raw_tools = field_value(event, fields["pending_tools"]) if "pending_tools" in fields else None
    error = field_value(event, fields["last_error"]) if "last_error" in fields else None
    generating = field_value(event, fields["generating"]) if "generating" in fields else None
    if isinstance(raw_tools, dict):
        raw_tools = [
            {"tool_id": k, **v} if isinstance(v, dict) else v for k, v in raw_tools.items()
        ]
    if isinstance(raw_tools, list) and raw_tools:
        tools = tuple(
            (str(t.get("tool_id", i)) if isinstance(t, dict) else str(i), t)
            for i, t in enumerate(raw_tools)
        )
        status = "awaiting_tool"
    elif generating is True:
        status = "generating"
    elif error:
        status, last_error = "failed", _as_error(error)
    return status, last_error, tools


def _as_error(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return str(value["message"])
    return str(value)


def trigger_token(snap: Snapshot) -> int:
    """Taken before a trigger is forwarded; see the module docstring."""
    return snap.state_seq


def accept_trigger(
    snap: Snapshot, token: int, trigger: Trigger, body: dict[str, Any], now: float
) -> Snapshot:
    """The upstream answered 2xx: the request (its JSON ``body``) was accepted.

    The first of the trigger's ``on_accept`` rules that matches the body
    applies. If events changed the state since the token was taken, they know
    more than this answer: only what the body itself names (a pending tool
    it resolved) is applied, never a status.
    """
    # (Nothing known now, ``unknown``: no event known overtook the answer,
    # which is then the best knowledge there is, as for a first trigger.)
    stale = snap.state_seq != token and snap.status != "unknown"
    if stale:
        for own in trigger.on_accept:
            if snap.status in own.supersedes and _matches(own, body):
                return apply_event(snap, own, body, now)
    rule = choose(trigger.on_accept, snap, body)
    if rule is None:
        return snap
    if stale:
        if rule.remove_pending is None:
            return snap
        rule = EventRule(remove_pending=rule.remove_pending)
    return apply_event(snap, rule, body, now)


def fail_trigger(snap: Snapshot, token: int, error: str, now: float) -> Snapshot:
    """The upstream answered the trigger with an error of the work itself."""
    if snap.state_seq != token:
        return snap
    return fail(snap, error, now)


def fail(snap: Snapshot, error: str, now: float) -> Snapshot:
    """End the work as failed: the evidence that it runs is gone."""
    moved = snap.touched(now)
    return replace(
        snap,
        status="failed",
        last_error=error,
        state_seq=snap.state_seq + 1,
        state_at=moved["updated_at"],
        forwarded_at=None,
        forwarded_by=None,
        **moved,
    )


def forwarding(snap: Snapshot, at: float, by: str) -> Snapshot:
    """A trigger that starts work goes upstream now (``at``, from replica
    ``by``): noted, never served, until its answer is applied
    (:func:`answered`) or a new state makes it moot.

    In a fleet the note is in the shared store before the request leaves, so
    that if the replica forwarding it is lost before the answer, whoever
    takes the stream over knows a step may be running that nobody saw start
    (see ``sidecar.state.evidence``). Only :attr:`Snapshot.version` moves:
    nothing a client is served changes."""
    if (snap.forwarded_at, snap.forwarded_by) == (at, by):
        return snap
    return replace(snap, forwarded_at=at, forwarded_by=by, version=snap.version + 1)


def answered(snap: Snapshot, at: float) -> Snapshot:
    """The trigger forwarded at ``at`` has its answer (or none will come):
    its note goes (not another trigger's, forwarded since)."""
    if snap.forwarded_at != at:
        return snap
    return replace(snap, forwarded_at=None, forwarded_by=None, version=snap.version + 1)


def starts_work(trigger: Trigger) -> bool:
    """Whether an accepted ``trigger`` may set work in flight (a step, a
    confirm; not an interrupt): only those are noted as forwarded."""
    return any(rule.status in ACTIVE for rule in trigger.on_accept)


def learn_session(snap: Snapshot, session_id: str) -> Snapshot:
    if snap.session_id == session_id:
        return snap
    return replace(snap, session_id=session_id, version=snap.version + 1)


def stream_changed(snap: Snapshot, stream: str, now: float) -> Snapshot:
    if stream not in STREAM_STATES:
        raise ValueError(f"unknown stream state {stream!r}")
    if snap.stream == stream:
        return snap
    return replace(snap, stream=stream, **snap.touched(now))


def is_active(snap: Snapshot) -> bool:
    """Work is in flight: the subscription must not be closed to save room."""
    return snap.status in ACTIVE


def in_flight(snap: Snapshot) -> bool:
    """Work is, or may be, in flight: active, or a trigger forwarded whose
    answer nobody applied (its forwarder may be lost). Its evidence is watched."""
    return snap.status in ACTIVE or snap.forwarded_at is not None
