"""Merging a snapshot into upstream bodies, ETags and content codings."""

from __future__ import annotations

import gzip
import json
import time

import brotli
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import merge
from sidecar.snapshot import Snapshot

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


# ------------------------------------------------------------------ ETags


def test_etag_roundtrip_forwards_the_upstream_tag_while_current() -> None:
    digest = merge.body_digest('W/"abc"', FAILED, "v1", 2)
    tag = merge.merged_etag('W/"abc"', digest)
    assert tag == f'W/"abc;sc={FAILED.digest}"'  # the upstream's tag covers its body
    assert merge.translate_if_none_match(tag, {digest}) == 'W/"abc"'


def test_etag_that_is_no_longer_current_is_dropped() -> None:
    tag = merge.merged_etag('"abc"', Snapshot().digest)
    assert merge.translate_if_none_match(tag, {FAILED.digest}) is None


def test_foreign_tags_and_star_pass() -> None:
    assert merge.translate_if_none_match('"x", W/"y"', set()) == '"x", W/"y"'
    assert merge.translate_if_none_match("*", set()) == "*"


def test_without_an_upstream_tag_the_digest_follows_the_resource_version() -> None:
    before = merge.body_digest(None, FAILED, "n01", 12)
    assert merge.body_digest(None, FAILED, "n02", 12) != before  # a content event came
    assert merge.body_digest(None, FAILED, "n01", 15) != before  # another length
    assert merge.body_digest(None, FAILED, "n01", 12) == before


def _parse_time(value: str) -> float:
    started = time.perf_counter()
    for _ in range(5):
        merge.parse_etags(value)
        merge.etag_digests(value)
    return time.perf_counter() - started


def test_etag_lists_parse_in_linear_time() -> None:
    size = 64 * 1024
    benign = ('W/"abc;sc=0123", ' * size)[:size]
    for hostile in (
        "a" + " " * size + "x",
        'W/"' + "x;sc=" * (size // 5) + '"',
        ", " * (size // 2),
    ):
        # Against a list of well-formed tags of the same length, in the same
        # run: a backtracking parser took thousands of times longer.
        assert _parse_time(hostile) < 20 * _parse_time(benign) + 0.01
    assert merge.parse_etags('W/"a", "b,c" , junk, W/"d"') == [
        (True, '"a"'),
        (False, '"b,c"'),
        (True, '"d"'),
    ]


# -------------------------------------------------------------- codings


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "identity", ""])
def test_codings_roundtrip(coding: str) -> None:
    body = b'{"a": 1}' * 100
    assert merge.decode_body(merge.encode_body(body, coding), coding, 10**6) == body


def test_decoding_is_bounded() -> None:
    bomb = gzip.compress(b"0" * 10_000_000)
    with pytest.raises(merge.MergeError):
        merge.decode_body(bomb, "gzip", 1_000_000)
    with pytest.raises(merge.MergeError):
        merge.decode_body(brotli.compress(b"0" * 2_000_000), "br", 1_000_000)


def test_unknown_coding_is_not_supported() -> None:
    assert not merge.supported_encoding("zstd")
    assert merge.supported_encoding("GZIP")


def test_without_an_upstream_tag_the_merged_tag_never_reaches_the_upstream() -> None:
    tag = merge.merged_etag(None, FAILED.digest)
    assert tag == f'W/";sc={FAILED.digest}"'
    assert merge.translate_if_none_match(tag, {FAILED.digest}) is None
    assert merge.etag_digests(tag) == {FAILED.digest}


def test_a_brotli_bomb_is_stopped_at_the_limit_not_inflated_whole() -> None:
    bomb = brotli.compress(b"0" * 200_000_000, quality=11)  # about 80 bytes in
    assert len(bomb) < 1000
    with pytest.raises(merge.MergeError, match="merge limit"):
        merge.decode_body(bomb, "br", 1_000_000)
    gz = gzip.compress(b"0" * 200_000_000)
    with pytest.raises(merge.MergeError, match="merge limit"):
        merge.decode_body(gz, "gzip", 1_000_000)


def test_a_gzip_body_of_several_members_is_decoded_whole() -> None:
    body = gzip.compress(b'{"a": 1, ') + gzip.compress(b'"b": 2}')
    assert merge.decode_body(body, "gzip", 10**6) == b'{"a": 1, "b": 2}'
    merged = merge.merge(merge.decode_body(body, "gzip", 10**6), "session", FAILED)
    assert json.loads(merged)["b"] == 2


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate"])
def test_a_truncated_body_is_not_a_short_document(coding: str) -> None:
    whole = merge.encode_body(b'{"a": "' + b"x" * 5000 + b'"}', coding)
    with pytest.raises(merge.MergeError):
        merge.decode_body(whole[: len(whole) // 2], coding, 10**6)
