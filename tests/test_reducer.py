"""The reducer with the built-in gptme profile: events, triggers and their races."""

from __future__ import annotations

import pytest

from sidecar import reducer
from sidecar.profile import Profile, load_profile
from sidecar.snapshot import Snapshot

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


def feed(profile: Profile, snap: Snapshot, *events: dict) -> Snapshot:
    for event in events:
        rule = profile.events.get(event["type"])
        if rule is not None:
            snap = reducer.apply_event(snap, rule, event, T)
    return snap


def step(profile: Profile):
    return profile.match_trigger("POST", "/api/v2/conversations/c/step")[0]


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
    assert snap.status == "completed"


def test_a_second_pending_tool_keeps_the_status_awaiting(gptme: Profile) -> None:
    snap = feed(
        gptme,
        Snapshot(),
        {"type": "tool_pending", "tool_id": "a"},
        {"type": "tool_pending", "tool_id": "b"},
        {"type": "tool_executing", "tool_id": "a"},
        {"type": "tool_complete", "tool_id": "a"},
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
    snap = reducer.accept_trigger(snap, token, step(gptme), T)
    assert (snap.status, snap.generating) == ("starting", True)


def test_late_trigger_answer_never_overwrites_events(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    # gptme 0.35.1 finished the whole step before /step answered.
    snap = feed(gptme, snap, {"type": "generation_started"}, {"type": "generation_complete"})
    after = reducer.accept_trigger(snap, token, step(gptme), T)
    assert after is snap and after.status == "completed"


def test_answer_then_events_ends_in_the_events_state(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    snap = reducer.accept_trigger(snap, token, step(gptme), T)
    snap = feed(gptme, snap, {"type": "generation_started"}, {"type": "error", "error": "x"})
    assert snap.status == "failed"


def test_stream_changes_do_not_count_as_overtaking_events(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    snap = reducer.stream_changed(snap, "live", T)
    assert reducer.accept_trigger(snap, token, step(gptme), T).status == "starting"


def test_failed_trigger_answer_reports_the_error_unless_overtaken(gptme: Profile) -> None:
    snap = Snapshot()
    token = reducer.trigger_token(snap)
    assert reducer.fail_trigger(snap, token, "early", T).last_error == "early"
    overtaken = feed(gptme, snap, {"type": "error", "error": "from stream"})
    assert reducer.fail_trigger(overtaken, token, "early", T).last_error == "from stream"


def test_every_change_bumps_version_and_digest(gptme: Profile) -> None:
    a = Snapshot()
    b = reducer.stream_changed(a, "live", T)
    c = feed(gptme, b, {"type": "generation_started"})
    assert a.version < b.version < c.version
    assert len({a.digest, b.digest, c.digest}) == 3


def test_unknown_stream_state_is_rejected() -> None:
    with pytest.raises(ValueError):
        reducer.stream_changed(Snapshot(), "sleepy", T)
