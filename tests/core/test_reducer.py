"""The reducer with the built-in gptme profile: events, triggers and their races."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core import reducer
from sidecar.core.profile import EventRule, Profile, load_profile
from sidecar.core.snapshot import Snapshot

T = 1_700_000_000.0
#: gptme 0.35.1's `connected` for a brand-new session: nothing generating, no error.
CONNECTED_IDLE = {
    "type": "connected",
    "session_id": "s",
    "generating": False,
    "last_error": None,
    "pending_tools": [],
}


@pytest.fixture(scope="module")
def gptme() -> Profile:
    return load_profile("gptme")


def feed(profile: Profile, snap: Snapshot, *events: dict, seen: set[str] | None = None) -> Snapshot:
    """Events in order, as one connection of a stream carries them (the registry's way)."""
    seen = set() if seen is None else seen
    for event in events:
        seen.update(profile.seen_tokens(event["type"], event))
        rules = profile.events.get(event["type"])
        if rules is not None:
            snap = reducer.reduce_event(snap, rules, event, T, seen)
    return snap


def step(profile: Profile):
    return profile.match_trigger("POST", "/api/v2/conversations/c/step")[0]


def confirm(profile: Profile):
    return profile.match_trigger("POST", "/api/v2/conversations/c/tool/confirm")[0]


def test_first_seen_is_unknown_never_idle() -> None:
    snap = Snapshot()
    assert snap.status == "unknown"
    assert snap.generating is None
    assert snap.as_dict()["generating"] is None


def test_error_event_fails_the_step_with_its_message(gptme: Profile) -> None:
    snap = feed(
        gptme, Snapshot(), {"type": "generation_started"}, {"type": "error", "error": "boom"}
    )
    assert (snap.status, snap.generating, snap.last_error) == ("failed", False, "boom")


def test_a_new_generation_clears_the_last_error(gptme: Profile) -> None:
    snap = feed(
        gptme, Snapshot(), {"type": "error", "error": "boom"}, {"type": "generation_started"}
    )
    assert (snap.status, snap.last_error) == ("generating", None)


def test_tokens_do_not_create_new_snapshots(gptme: Profile) -> None:
    snap = feed(gptme, Snapshot(), {"type": "generation_started"})
    again = feed(gptme, snap, *({"type": "generation_progress", "token": "x"} for _ in range(100)))
    assert again is snap


def test_ping_and_unknown_events_change_nothing(gptme: Profile) -> None:
    snap = Snapshot()
    assert feed(gptme, snap, {"type": "ping"}, {"type": "message_added", "message": {}}) is snap


def test_tool_lifecycle(gptme: Profile) -> None:
    snap = feed(
        gptme,
        Snapshot(),
        {"type": "generation_started"},
        {"type": "generation_complete", "message": {}},
        {
            "type": "tool_pending",
            "tool_id": "t1",
            "tooluse": {"tool": "shell"},
            "auto_confirm": False,
        },
    )
    assert (snap.status, snap.generating) == ("awaiting_tool", False)
    assert snap.as_dict()["pending_tools"] == [
        {"tool_id": "t1", "tooluse": {"tool": "shell"}, "auto_confirm": False}
    ]
    snap = feed(gptme, snap, {"type": "tool_executing", "tool_id": "t1"})
    assert (snap.status, snap.generating, snap.pending_tools) == ("running_tool", True, ())
    snap = feed(gptme, snap, {"type": "tool_complete", "tool_id": "t1", "success": True})
    assert snap.status == "running_tool"  # gptme generates again: the model reads the output
    snap = feed(gptme, snap, {"type": "generation_started"}, {"type": "generation_complete"})
    assert snap.status == "completed"


def test_a_second_pending_tool_keeps_the_status_awaiting(gptme: Profile) -> None:
    snap = feed(
        gptme,
        Snapshot(),
        {"type": "tool_pending", "tool_id": "a"},
        {"type": "tool_pending", "tool_id": "b"},
        {"type": "tool_executing", "tool_id": "a"},
        {"type": "tool_complete", "tool_id": "a"},
        {"type": "generation_started"},
        {"type": "generation_complete"},
    )
    assert snap.status == "awaiting_tool"
    assert [k for k, _ in snap.pending_tools] == ["b"]


def test_interrupt_clears_pending_tools(gptme: Profile) -> None:
    snap = feed(
        gptme, Snapshot(), {"type": "tool_pending", "tool_id": "a"}, {"type": "interrupted"}
    )
    assert (snap.status, snap.pending_tools) == ("interrupted", ())


def test_connected_with_no_state_fields_stays_unknown(gptme: Profile) -> None:
    # gptme 0.31.0
    assert feed(gptme, Snapshot(), {"type": "connected", "session_id": "s"}).status == "unknown"


def test_connected_not_generating_proves_nothing(gptme: Profile) -> None:
    # gptme 0.35.1 describes the new observer session, not the conversation.
    assert feed(gptme, Snapshot(), CONNECTED_IDLE).status == "unknown"


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"generating": True}, "generating"),
        ({"last_error": "bad key"}, "failed"),
        ({"pending_tools": [{"tool_id": "t", "tooluse": {}}]}, "awaiting_tool"),
    ],
)
def test_connected_with_positive_evidence_is_used_while_unknown(
    gptme: Profile, fields: dict, status: str
) -> None:
    snap = feed(gptme, Snapshot(), {**CONNECTED_IDLE, **fields})
    assert snap.status == status


def test_connected_never_overrides_observed_state(gptme: Profile) -> None:
    snap = feed(gptme, Snapshot(), {"type": "generation_complete"})
    assert feed(gptme, snap, {"type": "connected", "last_error": "old"}).status == "completed"


# ------------------------------------------------------------ triggers


def test_accepted_trigger_reports_starting_at_once(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    snap = reducer.accept_trigger(snap, token, step(gptme), {}, T)
    assert (snap.status, snap.generating) == ("starting", True)


def test_late_trigger_answer_never_overwrites_events(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    # gptme 0.35.1 finished the whole step before /step answered.
    snap = feed(gptme, snap, {"type": "generation_started"}, {"type": "generation_complete"})
    after = reducer.accept_trigger(snap, token, step(gptme), {}, T)
    assert after is snap and after.status == "completed"


def test_answer_then_events_ends_in_the_events_state(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    snap = reducer.accept_trigger(snap, token, step(gptme), {}, T)
    snap = feed(gptme, snap, {"type": "generation_started"}, {"type": "error", "error": "x"})
    assert snap.status == "failed"


def test_stream_changes_do_not_count_as_overtaking_events(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    snap = reducer.stream_changed(snap, "live", T)
    assert reducer.accept_trigger(snap, token, step(gptme), {}, T).status == "starting"


def test_failed_trigger_answer_reports_the_error_unless_overtaken(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    assert reducer.fail_trigger(snap, token, "early", T).last_error == "early"
    overtaken = feed(gptme, snap, {"type": "error", "error": "from stream"})
    assert reducer.fail_trigger(overtaken, token, "early", T).last_error == "from stream"


def test_a_forwarded_trigger_is_noted_unseen_until_its_answer_or_a_new_state(
    gptme: Profile,
) -> None:
    """In a fleet, the note that a step went upstream is never served, and
    goes with its own answer, or with any state the events bring."""
    done = feed(gptme, Snapshot(), {"type": "generation_complete"})
    noted = reducer.forwarding(done, T, "replica-a")
    assert (noted.forwarded_at, noted.forwarded_by) == (T, "replica-a")
    assert reducer.in_flight(noted)
    assert noted.body == done.body  # the same answer, the same tag
    assert not reducer.in_flight(reducer.answered(noted, T))
    assert reducer.answered(noted, T + 1) is noted  # another trigger's answer
    token = reducer.trigger_token(noted)
    accepted = reducer.accept_trigger(noted, token, step(gptme), {}, T)
    assert (accepted.status, accepted.forwarded_at) == ("starting", None)
    evented = feed(gptme, noted, {"type": "generation_started"})
    assert evented.forwarded_at is None
    assert reducer.fail(noted, "gone", T).forwarded_at is None
    interrupt = next(t for t in gptme.triggers if t.path.template.endswith("/interrupt"))
    assert reducer.starts_work(step(gptme)) and not reducer.starts_work(interrupt)


def test_every_change_bumps_version_and_digest(gptme: Profile) -> None:
    a = Snapshot()
    b = reducer.stream_changed(a, "live", T)
    c = feed(gptme, b, {"type": "generation_started"})
    assert a.version < b.version < c.version
    assert len({a.digest, b.digest, c.digest}) == 3


def test_unknown_stream_state_is_rejected() -> None:
    with pytest.raises(ValueError):
        reducer.stream_changed(Snapshot(), "sleepy", T)


# ------------------------------------------- what the real servers send
# Event sequences as gptme 0.31.0 / 0.35.1 and opencode 1.18.33 send them
# (docs/real-servers.md; tests/real/test_real_*.py check the
# same against the released servers).


def test_a_skipped_tool_is_removed_although_no_event_names_it(gptme: Profile) -> None:
    snap = feed(
        gptme,
        Snapshot(),
        {"type": "generation_started"},
        {"type": "generation_complete"},
        {"type": "tool_pending", "tool_id": "t1", "auto_confirm": False},
    )
    token = reducer.trigger_token(snap)
    # gptme sends its note and starts a new generation before answering.
    snap = feed(gptme, snap, {"type": "message_added"}, {"type": "generation_started"})
    snap = reducer.accept_trigger(
        snap, token, confirm(gptme), {"tool_id": "t1", "action": "skip"}, T
    )
    assert (snap.status, snap.pending_tools) == ("generating", ())
    snap = feed(gptme, snap, {"type": "generation_complete"})
    assert snap.status == "completed"


def test_an_accepted_skip_starts_new_work_when_no_event_came_first(gptme: Profile) -> None:
    snap = feed(gptme, Snapshot(), {"type": "tool_pending", "tool_id": "t1"})
    token = reducer.trigger_token(snap)
    snap = reducer.accept_trigger(
        snap, token, confirm(gptme), {"tool_id": "t1", "action": "skip"}, T
    )
    assert (snap.status, snap.generating, snap.pending_tools) == ("starting", True, ())


def test_a_confirmed_tool_runs(gptme: Profile) -> None:
    snap = feed(gptme, Snapshot(), {"type": "tool_pending", "tool_id": "t1"})
    token = reducer.trigger_token(snap)
    body = {"tool_id": "t1", "action": "confirm"}
    snap = reducer.accept_trigger(snap, token, confirm(gptme), body, T)
    assert (snap.status, snap.pending_tools) == ("running_tool", ())


def test_an_unknown_action_changes_nothing(gptme: Profile) -> None:
    snap = feed(gptme, Snapshot(), {"type": "tool_pending", "tool_id": "t1"})
    body = {"tool_id": "t1", "action": "dance"}
    assert reducer.accept_trigger(snap, snap.state_seq, confirm(gptme), body, T) is snap


def test_an_auto_confirmed_tool_is_not_awaiting_a_human(gptme: Profile) -> None:
    snap = feed(
        gptme,
        Snapshot(),
        {"type": "generation_started"},
        {"type": "generation_complete"},
        {"type": "tool_pending", "tool_id": "t1", "auto_confirm": True},
    )
    assert (snap.status, snap.generating, snap.pending_tools) == ("running_tool", True, ())


@pytest.mark.parametrize("version", ["0.31.0", "0.35.1"])
def test_late_events_after_an_interrupt_leave_it_interrupted(gptme: Profile, version) -> None:
    late = (
        [{"type": "message_added"}, {"type": "generation_complete"}]
        if version == "0.31.0"
        else [{"type": "generation_progress", "token": "x"}]
    )
    snap = feed(
        gptme,
        Snapshot(),
        {"type": "generation_started"},
        {"type": "generation_progress", "token": "a"},
        {"type": "interrupted"},
        *late,
    )
    assert (snap.status, snap.generating) == ("interrupted", False)
    assert feed(gptme, snap, {"type": "generation_started"}).status == "generating"


def test_0_35_1_completes_at_step_complete_not_before(gptme: Profile) -> None:
    seen: set[str] = set()
    snap = feed(
        gptme,
        Snapshot(),
        {"type": "generation_started"},
        {"type": "generation_complete"},
        {"type": "step_complete"},
        seen=seen,
    )
    assert snap.status == "completed"
    # Once the stream has shown it ends steps, an answer alone does not:
    # auto-confirmed tool work continues the same step.
    snap = feed(
        gptme,
        snap,
        {"type": "generation_started"},
        {"type": "generation_complete"},
        seen=seen,
    )
    assert (snap.status, snap.generating) == ("generating", True)
    snap = feed(
        gptme,
        snap,
        {"type": "tool_pending", "tool_id": "t", "auto_confirm": True},
        {"type": "step_complete"},  # 0.35.1 sends it here, before the tool runs
        seen=seen,
    )
    assert snap.status == "running_tool"
    snap = feed(
        gptme,
        snap,
        {"type": "tool_executing", "tool_id": "t"},
        {"type": "tool_complete", "tool_id": "t"},
        {"type": "generation_started"},
        {"type": "generation_complete"},
        {"type": "step_complete"},
        seen=seen,
    )
    assert snap.status == "completed"


@pytest.mark.parametrize("before", ["failed", "interrupted", "awaiting_tool"])
def test_step_complete_keeps_a_failure_an_interrupt_or_a_waiting_tool(
    gptme: Profile, before: str
) -> None:
    event = {
        "failed": {"type": "error", "error": "boom"},
        "interrupted": {"type": "interrupted"},
        "awaiting_tool": {"type": "tool_pending", "tool_id": "t"},
    }[before]
    snap = feed(gptme, Snapshot(), {"type": "generation_started"}, event, {"type": "step_complete"})
    assert snap.status == before


# --------------------------------------------------------------- opencode


@pytest.fixture(scope="module")
def opencode() -> Profile:
    return load_profile("opencode")


def oc(event_type: str, **properties) -> dict:
    return {"type": event_type, "properties": {"sessionID": "ses_x", **properties}}


BUSY = oc("session.status", status={"type": "busy"})
IDLE = [oc("session.status", status={"type": "idle"}), oc("session.idle")]


def test_opencode_failure_survives_the_idle_statuses_after_it(opencode: Profile) -> None:
    error = {"name": "APIError", "data": {"message": "Incorrect API key", "statusCode": 401}}
    snap = feed(
        opencode,
        Snapshot(),
        BUSY,
        BUSY,
        oc("session.error", error=error),
        *IDLE,
        oc("message.updated"),
        *IDLE,
    )
    assert (snap.status, snap.generating, snap.last_error) == (
        "failed",
        False,
        "Incorrect API key",
    )


def test_opencode_success_completes_at_idle(opencode: Profile) -> None:
    snap = feed(opencode, Snapshot(), BUSY, BUSY, *IDLE)
    assert (snap.status, snap.last_error) == ("completed", None)


def test_opencode_abort_is_interrupted(opencode: Profile) -> None:
    aborted = {"name": "MessageAbortedError", "data": {"message": "Aborted"}}
    snap = feed(opencode, Snapshot(), BUSY, oc("session.error", error=aborted), *IDLE, *IDLE)
    assert (snap.status, snap.last_error) == ("interrupted", None)


def test_opencode_retry_is_visible_while_generating(opencode: Profile) -> None:
    retry = {"type": "retry", "attempt": 2, "message": "Rate limit reached", "next": 1795501643380}
    snap = feed(opencode, Snapshot(), BUSY, oc("session.status", status=retry))
    assert (snap.status, snap.generating) == ("generating", True)
    assert snap.as_dict()["retry"] == {
        "attempt": 2,
        "message": "Rate limit reached",
        "next_at": "2026-11-24T06:27:23.380Z",
    }
    snap = feed(opencode, snap, BUSY)
    assert snap.retry is not None  # still the same work
    snap = feed(opencode, snap, *IDLE)
    assert (snap.status, snap.retry) == ("completed", None)


@pytest.mark.parametrize(
    "retry",
    [
        {"type": "retry", "attempt": "2", "message": {"x": 1}, "next": "soon"},
        {"type": "retry", "attempt": 1.5, "message": 3, "next": 1e300},
        {"type": "retry", "attempt": True, "next": float("inf")},
    ],
)
def test_a_retry_of_the_wrong_types_reads_null_never_a_type_the_schema_denies(
    opencode: Profile, retry: dict[str, Any]
) -> None:
    snap = feed(opencode, Snapshot(), BUSY, oc("session.status", status=retry))
    assert snap.status == "generating"
    shown = snap.as_dict()["retry"]
    assert shown["attempt"] is None and shown["message"] is None
    assert shown["next_at"] in (None, "soon")


def test_opencode_permission_ask_and_reply(opencode: Profile) -> None:
    asked = oc(
        "permission.asked",
        id="per_1",
        permission="bash",
        patterns=["ls"],
        tool={"messageID": "m", "callID": "c"},
    )
    snap = feed(opencode, Snapshot(), BUSY, asked, BUSY)
    assert (snap.status, snap.generating) == ("awaiting_tool", False)
    assert [k for k, _ in snap.pending_tools] == ["per_1"]
    snap = feed(opencode, snap, oc("permission.replied", requestID="per_1", reply="once"))
    assert (snap.status, snap.pending_tools) == ("running_tool", ())
    assert feed(opencode, snap, BUSY, *IDLE).status == "completed"


def test_opencode_rejected_permission_ends_interrupted(opencode: Profile) -> None:
    asked = oc("permission.asked", id="per_1", permission="bash")
    snap = feed(opencode, Snapshot(), BUSY, asked)
    snap = feed(opencode, snap, oc("permission.replied", requestID="per_1", reply="reject"), *IDLE)
    assert (snap.status, snap.pending_tools) == ("interrupted", ())


def test_a_match_on_true_does_not_take_one() -> None:
    rule = EventRule(status="failed", match=(("flag", (True,)),))
    assert reducer.choose((rule,), Snapshot(), {"flag": 1}) is None
    assert reducer.choose((rule,), Snapshot(), {"flag": True}) is rule


def abort(profile: Profile):
    return profile.match_trigger("POST", "/session/ses_" + "a" * 26 + "/abort")[0]


def test_opencode_abort_during_a_retry_ends_interrupted(opencode: Profile) -> None:
    retry = {"type": "retry", "attempt": 1, "message": "Rate limit", "next": 1}
    snap = feed(opencode, Snapshot(), BUSY, oc("session.status", status=retry))
    token = reducer.trigger_token(snap)
    snap = feed(opencode, snap, *IDLE)  # no MessageAbortedError: a plain idle, then the answer
    assert snap.status == "completed"
    snap = reducer.accept_trigger(snap, token, abort(opencode), {}, T)
    assert (snap.status, snap.retry) == ("interrupted", None)


def test_opencode_abort_of_finished_work_changes_nothing(opencode: Profile) -> None:
    snap = feed(opencode, Snapshot(), BUSY, *IDLE)
    token = reducer.trigger_token(snap)
    assert reducer.accept_trigger(snap, token, abort(opencode), {}, T) is snap


def test_0_35_1_is_known_from_its_connected_event(gptme: Profile) -> None:
    # Its first step on a new connection: no step_complete seen yet, but only
    # 0.35.1's connected event carries `generating`.
    seen: set[str] = set()
    snap = feed(
        gptme,
        Snapshot(),
        CONNECTED_IDLE,
        {"type": "generation_started"},
        {"type": "generation_complete"},
        seen=seen,
    )
    assert snap.status == "generating"
    assert feed(gptme, snap, {"type": "step_complete"}, seen=seen).status == "completed"
    # 0.31.0's connected has no state: its answer ends the step.
    snap = feed(
        gptme,
        Snapshot(),
        {"type": "connected", "session_id": "s"},
        {"type": "generation_started"},
        {"type": "generation_complete"},
    )
    assert snap.status == "completed"
