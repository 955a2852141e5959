"""The ETags of merged answers: the upstream's tag with the snapshot's digest."""

from __future__ import annotations

import time

from sidecar.core.snapshot import Snapshot
from sidecar.http import etags

FAILED = Snapshot(
    status="failed", last_error="bad key", stream="live", updated_at=1.0, version=3, state_seq=2
)


# ------------------------------------------------------------------ ETags


def test_etag_roundtrip_forwards_the_upstream_tag_while_current() -> None:
    digest = etags.body_digest('W/"abc"', FAILED, "v1", 2)
    tag = etags.merged_etag('W/"abc"', digest)
    assert tag == f'W/"abc;sc={FAILED.digest}"'  # the upstream's tag covers its body
    assert etags.translate_if_none_match(tag, {digest}) == 'W/"abc"'


def test_etag_that_is_no_longer_current_is_dropped() -> None:
    tag = etags.merged_etag('"abc"', Snapshot().digest)
    assert etags.translate_if_none_match(tag, {FAILED.digest}) is None


def test_foreign_tags_and_star_pass() -> None:
    assert etags.translate_if_none_match('"x", W/"y"', set()) == '"x", W/"y"'
    assert etags.translate_if_none_match("*", set()) == "*"


def test_without_an_upstream_tag_the_digest_follows_the_resource_version() -> None:
    before = etags.body_digest(None, FAILED, "n01", 12)
    assert etags.body_digest(None, FAILED, "n02", 12) != before  # a content event came
    assert etags.body_digest(None, FAILED, "n01", 15) != before  # another length
    assert etags.body_digest(None, FAILED, "n01", 12) == before


def _parse_time(value: str) -> float:
    started = time.perf_counter()
    for _ in range(5):
        etags.parse_etags(value)
        etags.etag_digests(value)
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
    assert etags.parse_etags('W/"a", "b,c" , junk, W/"d"') == [
        (True, '"a"'),
        (False, '"b,c"'),
        (True, '"d"'),
    ]


def test_without_an_upstream_tag_the_merged_tag_never_reaches_the_upstream() -> None:
    tag = etags.merged_etag(None, FAILED.digest)
    assert tag == f'W/";sc={FAILED.digest}"'
    assert etags.translate_if_none_match(tag, {FAILED.digest}) is None
    assert etags.etag_digests(tag) == {FAILED.digest}
