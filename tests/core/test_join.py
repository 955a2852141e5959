"""The first event a client's own stream is told (``[stream.join]``), as bytes."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from sidecar.core.join import first_event_end, tell, time_id
from sidecar.core.profile import ProfileError, load_profile, parse_profile
from sidecar.core.snapshot import Snapshot

ROOT = Path(__file__).resolve().parents[2]
GPTME = load_profile("gptme")
OPENCODE = load_profile("opencode")
assert GPTME.join is not None and OPENCODE.join is not None
CONNECTED_0_35_1 = (
    b'data: {"type": "connected", "session_id": "s-new", "generating": false, '
    b'"last_error": null, "pending_tools": [], "extra": 12345678901234567890123}\n\n'
)
TOOL = {"tool_id": "t1", "tooluse": {"tool": "shell", "args": [], "content": "ls"}}


def told_data(out: bytes) -> dict:
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")
    return json.loads(out[len(b"data: ") : -2])


@pytest.mark.parametrize(
    ("buf", "end"),
    [
        (b"data: x\n\n", 9),
        (b"data: x\r\n\r\nmore", 11),
        (b"data: x\r\rdata: y", 9),
        (b"\xef\xbb\xbfdata: x\n\n", 12),
        (b"data: x\n", None),
        (b"data: x\r\n\r", None),  # a CR at the end may be half a CRLF
        (b"", None),
        (b"\n", 1),  # an empty event: ends at once (and is not the event to tell)
    ],
)
def test_the_first_event_ends_at_its_blank_line(buf: bytes, end: int | None) -> None:
    assert first_event_end(buf) == end


def test_generating_is_the_conversations_and_every_other_field_is_kept() -> None:
    snap = Snapshot(status="generating", stream="live")
    out = tell(GPTME.join, GPTME.type_field, CONNECTED_0_35_1, snap)
    assert out is not None
    data = told_data(out)
    assert data == {
        "type": "connected",
        "session_id": "s-new",
        "generating": True,
        "last_error": None,
        "pending_tools": [],
        "extra": 12345678901234567890123,  # a big integer stays exact
    }
    assert list(data) == [
        "type",
        "session_id",
        "generating",
        "last_error",
        "pending_tools",
        "extra",
    ]


def test_a_tool_waiting_and_an_error_are_told() -> None:
    snap = Snapshot(status="awaiting_tool", pending_tools=(("t1", TOOL),))
    data = told_data(tell(GPTME.join, "type", CONNECTED_0_35_1, snap) or b"")
    assert data["pending_tools"] == [TOOL] and data["generating"] is False
    failed = Snapshot(status="failed", last_error="bad key")
    data = told_data(tell(GPTME.join, "type", CONNECTED_0_35_1, failed) or b"")
    assert data["last_error"] == "bad key" and data["generating"] is False


@pytest.mark.parametrize(
    "snap",
    [None, Snapshot(), Snapshot(status="unknown", pending_tools=(("t1", TOOL),))],
)
def test_unknown_state_passes_as_it_came(snap: Snapshot | None) -> None:
    assert tell(GPTME.join, "type", CONNECTED_0_35_1, snap) is None


def test_the_same_state_passes_as_it_came() -> None:
    assert tell(GPTME.join, "type", CONNECTED_0_35_1, Snapshot(status="completed")) is None


@pytest.mark.parametrize(
    "block",
    [
        b'data: {"type": "ping"}\n\n',
        b"data: not json\n\n",
        b"data: [1, 2]\n\n",
        b": a comment\n\n",
        b"\n",
        b'event: x\ndata: {"type": 1}\n\n',
    ],
)
def test_any_other_first_event_passes_as_it_came(block: bytes) -> None:
    assert tell(GPTME.join, "type", block, Snapshot(status="generating")) is None


def test_0_31_0s_connected_gains_no_fields() -> None:
    block = b'data: {"type": "connected", "session_id": "s1"}\n\n'
    assert tell(GPTME.join, "type", block, Snapshot(status="generating")) is None


def test_other_lines_of_the_event_are_kept_in_place() -> None:
    block = (
        b'event: hello\r\nid: 7\r\ndata: {"type": "connected",\r\n'
        b'data: "generating": false}\r\n\r\n'
    )
    out = tell(GPTME.join, "type", block, Snapshot(status="running_tool"))
    assert out == b'event: hello\nid: 7\ndata: {"type":"connected","generating":true}\n\n'


def test_opencode_is_followed_by_the_status_of_each_session_at_work() -> None:
    block = b'data: {"type":"server.connected","properties":{}}\n\n'
    known = [
        ("ses_a", Snapshot(status="generating")),
        ("ses_b", Snapshot(status="completed")),
        ("ses_c", Snapshot(status="awaiting_tool")),
        ("ses_d", Snapshot()),
    ]
    out = tell(OPENCODE.join, OPENCODE.type_field, block, None, known)
    assert out is not None and out.startswith(block)
    events = [json.loads(e[len(b"data: ") :]) for e in out[len(block) :].split(b"\n\n") if e]
    ids = [e.pop("id") for e in events]
    assert all(re.fullmatch(r"evt_[0-9a-f]{12}[0-9A-Za-z]{14}", i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 2
    assert events == [
        {"type": "session.status", "properties": {"sessionID": s, "status": {"type": "busy"}}}
        for s in ("ses_a", "ses_c")
    ]
    assert tell(OPENCODE.join, "type", block, None, known[1:2]) is None  # none at work


def profile_with(join: str) -> dict:
    """The gptme profile, with another ``[stream.join]``."""
    data = tomllib.loads((ROOT / "config" / "gptme.toml").read_text(encoding="utf-8"))
    data["stream"]["join"] = tomllib.loads(join)
    return data


@pytest.mark.parametrize(
    ("join", "message"),
    [
        ('event = "connected"', "nothing to tell"),
        ('event = "c"\nset = { status = "status" }', "unknown field 'status'"),
        ('event = "c"\nset = { generating = "g" }\nmax_bytes = 0', "max_bytes"),
        ('event = "c"\nset = { generating = "g" }\nmax_seconds = 600', "max_seconds"),
        ('event = "c"\nfollow = [{ when_status = [], event = {} }]', "when_status"),
        ('event = "c"\nfollow = [{ when_status = ["busy"], event = {} }]', "unknown status"),
        ('event = "c"\nset = { generating = "g" }\nother = 1', "stream.join.other: unknown key"),
    ],
)
def test_a_bad_join_table_is_refused_by_name(join: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_profile(profile_with(join))


def test_time_ids_grow_within_a_millisecond_and_across() -> None:
    same = [time_id(1_700_000_000.0001) for _ in range(3)]
    later = time_id(1_700_000_000.002)
    assert [i[:12] for i in same] == sorted({i[:12] for i in same})
    assert later[:12] > same[-1][:12] and len(later) == 26
