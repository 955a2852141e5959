"""Content codings: decoded with a bound, encoded again."""

from __future__ import annotations

import gzip
import json

import brotli
import pytest

from sidecar.core.merge import MergeError, merge
from sidecar.core.snapshot import Snapshot
from sidecar.http import codings

FAILED = Snapshot(
    status="failed", last_error="bad key", stream="live", updated_at=1.0, version=3, state_seq=2
)


# -------------------------------------------------------------- codings


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "identity", ""])
def test_codings_roundtrip(coding: str) -> None:
    body = b'{"a": 1}' * 100
    assert codings.decode_body(codings.encode_body(body, coding), coding, 10**6) == body


def test_decoding_is_bounded() -> None:
    bomb = gzip.compress(b"0" * 10_000_000)
    with pytest.raises(MergeError):
        codings.decode_body(bomb, "gzip", 1_000_000)
    with pytest.raises(MergeError):
        codings.decode_body(brotli.compress(b"0" * 2_000_000), "br", 1_000_000)


def test_unknown_coding_is_not_supported() -> None:
    assert not codings.supported_encoding("zstd")
    assert codings.supported_encoding("GZIP")


def test_a_brotli_bomb_is_stopped_at_the_limit_not_inflated_whole() -> None:
    bomb = brotli.compress(b"0" * 200_000_000, quality=11)  # about 80 bytes in
    assert len(bomb) < 1000
    with pytest.raises(MergeError, match="merge limit"):
        codings.decode_body(bomb, "br", 1_000_000)
    gz = gzip.compress(b"0" * 200_000_000)
    with pytest.raises(MergeError, match="merge limit"):
        codings.decode_body(gz, "gzip", 1_000_000)


def test_a_gzip_body_of_several_members_is_decoded_whole() -> None:
    body = gzip.compress(b'{"a": 1, ') + gzip.compress(b'"b": 2}')
    assert codings.decode_body(body, "gzip", 10**6) == b'{"a": 1, "b": 2}'
    merged = merge(codings.decode_body(body, "gzip", 10**6), "session", FAILED)
    assert json.loads(merged)["b"] == 2


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate"])
def test_a_truncated_body_is_not_a_short_document(coding: str) -> None:
    whole = codings.encode_body(b'{"a": "' + b"x" * 5000 + b'"}', coding)
    with pytest.raises(MergeError):
        codings.decode_body(whole[: len(whole) // 2], coding, 10**6)
