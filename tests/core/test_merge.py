"""Merging a snapshot into upstream bodies."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core import merge
from sidecar.core.snapshot import Snapshot

FAILED = Snapshot(
    status="failed", last_error="bad key", stream="live", updated_at=1.0, version=3, state_seq=2
)


def test_insert_when_key_absent_keeps_every_upstream_byte() -> None:
    body = b'{"id": "c", "log": [{"role": "user", "content": "hi"}]}'
    out = merge.merge(body, "session", FAILED)
    assert out.endswith(body[1:])
    doc = orjson.loads(out)
    assert doc["session"]["status"] == "failed"
    assert doc["session"]["last_error"] == "bad key"
    assert doc["log"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body", [b"{}", b"  {  }", b"{" + b" " * 100 + b"}", b"\n{\r\n\t}\n"])
def test_insert_into_empty_objects_whatever_the_whitespace(body: bytes) -> None:
    assert orjson.loads(merge.merge(body, "session", FAILED)) == {"session": FAILED.as_dict()}


def test_key_in_a_message_text_is_not_mistaken_for_the_field() -> None:
    body = orjson.dumps({"log": [{"content": 'the "session" word'}]})
    doc = orjson.loads(merge.merge(body, "session", FAILED))
    assert doc["session"]["status"] == "failed"


def test_observed_fields_win_over_upstream_session_other_keys_kept() -> None:
    body = orjson.dumps(
        {"id": "c", "session": {"id": "s1", "generating": False, "last_error": None, "extra": 1}}
    )
    doc = orjson.loads(merge.merge(body, "session", FAILED))
    assert doc["session"]["last_error"] == "bad key"
    assert doc["session"]["generating"] is False
    assert doc["session"]["id"] == "s1"  # the sidecar did not observe the id
    assert doc["session"]["extra"] == 1
    assert doc["id"] == "c"


def test_unknown_status_keeps_upstream_generating_and_error() -> None:
    body = orjson.dumps({"session": {"id": "s1", "generating": True, "last_error": None}})
    doc = orjson.loads(merge.merge(body, "session", Snapshot()))
    assert doc["session"]["status"] == "unknown"
    assert doc["session"]["generating"] is True


def test_huge_integers_survive_the_full_parse() -> None:
    body = b'{"n": 123456789012345678901234567890, "session": {"id": "s"}}'
    doc = json.loads(merge.merge(body, "session", FAILED))
    assert doc["n"] == 123456789012345678901234567890
    assert doc["session"]["id"] == "s"


def test_non_object_bodies_are_refused() -> None:
    for body in (b"[1, 2]", b'"x"', b"", b"null"):
        with pytest.raises(merge.MergeError):
            merge.merge(body, "session", FAILED)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=6,
    )
)
def test_merge_output_is_json_with_upstream_keys_intact(doc: dict) -> None:
    # The standard library's json is the reference: it takes any integer.
    out = json.loads(merge.merge(json.dumps(doc).encode(), "session", FAILED))
    for key, value in doc.items():
        if key != "session":
            assert out[key] == value
    assert out["session"]["status"] == "failed"


def test_a_list_gets_the_snapshot_of_each_item_that_has_one_and_keeps_the_rest() -> None:
    body = orjson.dumps(
        {
            "conversations": [
                {"id": "a", "n": 1},
                {"id": "b", "session": {"id": "s", "extra": 1}},
                {"id": "c"},
                {"no": "id"},
                "not an item",
                {"id": "a"},
            ],
            "next_cursor": "x",
        }
    )
    listed = merge.read_list(body, "conversations")
    out, enriched = merge.merge_list(listed, "session", "id", {"a": FAILED, "b": FAILED})
    assert enriched == 3  # "a" is listed twice
    assert out is not None
    doc = orjson.loads(out)
    items = doc["conversations"]
    assert items[0] == {"id": "a", "n": 1, "session": FAILED.as_dict()}
    assert items[1]["session"]["extra"] == 1 and items[1]["session"]["id"] == "s"
    assert items[1]["session"]["status"] == "failed"
    assert items[2] == {"id": "c"} and items[3] == {"no": "id"} and items[4] == "not an item"
    assert doc["next_cursor"] == "x"


def test_a_list_with_nothing_observed_is_not_written_again() -> None:
    listed = merge.read_list(b'[{"id": "a"}]', None)
    assert merge.merge_list(listed, "session", "id", {}) == (None, 0)


def test_a_list_with_huge_integers_keeps_them_exact() -> None:
    body = b'[{"id": "a", "big": 123456789012345678901234567890}]'
    out, enriched = merge.merge_list(merge.read_list(body, None), "session", "id", {"a": FAILED})
    assert enriched == 1 and out is not None
    assert json.loads(out)[0]["big"] == 123456789012345678901234567890


@pytest.mark.parametrize(
    "body", [b'{"items": []}', b"42", b"not json", b'{"conversations": {}}', b"[NaN]"]
)
def test_what_is_not_a_list_of_items_is_refused(body: bytes) -> None:
    with pytest.raises(merge.MergeError):
        merge.merge_list(merge.read_list(body, "conversations"), "session", "id", {"a": FAILED})


def test_the_newest_items_come_first_by_their_time_of_change() -> None:
    body = orjson.dumps(
        [
            {"id": "old", "t": {"u": 1}},
            {"id": "none"},
            {"id": "new", "t": {"u": 3}},
            {"id": "mid", "t": {"u": 2}},
            {"id": "bad", "t": {"u": "yesterday"}},
        ]
    )
    listed = merge.read_list(body, None)
    assert listed.newest("id", "t.u", 3) == ["new", "mid", "old"]
    assert listed.newest("id", None, 2) == ["old", "none"]  # the list's own order
