"""Content codings: decoded with a bound, encoded again."""

from __future__ import annotations

import gzip
import json
import struct

import brotli
import pytest

from sidecar.core.merge import MergeError, merge
from sidecar.core.snapshot import Snapshot
from sidecar.http import codings
from sidecar.http.codings import zstd

FAILED = Snapshot(
    status="failed", last_error="bad key", stream="live", updated_at=1.0, version=3, state_seq=2
)


# -------------------------------------------------------------- codings


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd", "identity", ""])
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
    assert not codings.supported_encoding("compress")
    assert not codings.supported_encoding("dcz")
    assert codings.supported_encoding("GZIP")
    assert codings.supported_encoding("zstd")


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


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate", "zstd"])
def test_a_truncated_body_is_not_a_short_document(coding: str) -> None:
    whole = codings.encode_body(b'{"a": "' + b"x" * 5000 + b'"}', coding)
    with pytest.raises(MergeError):
        codings.decode_body(whole[: len(whole) // 2], coding, 10**6)


# -------------------------------------------------------------- zstd


def test_a_zstd_bomb_is_stopped_at_the_limit_not_inflated_whole() -> None:
    bomb = zstd.compress(b"0" * 200_000_000, level=19)  # a few KB in
    assert len(bomb) < 10_000
    with pytest.raises(MergeError, match="merge limit"):
        codings.decode_body(bomb, "zstd", 1_000_000)
    exact = b"0" * 1_000_000
    assert codings.decode_body(zstd.compress(exact), "zstd", 1_000_000) == exact


def test_a_zstd_body_of_several_frames_is_decoded_whole() -> None:
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"xyz"  # RFC 8878 3.1.2
    body = zstd.compress(b'{"a": 1, ') + skippable + zstd.compress(b'"b": 2}')
    assert codings.decode_body(body, "zstd", 10**6) == b'{"a": 1, "b": 2}'
    merged = merge(codings.decode_body(body, "zstd", 10**6), "session", FAILED)
    assert json.loads(merged)["b"] == 2
    # The limit counts every frame's output, not each frame's.
    with pytest.raises(MergeError, match="merge limit"):
        codings.decode_body(zstd.compress(b"1" * 600) * 2, "zstd", 1000)


def test_a_zstd_window_beyond_rfc_9659s_8_mb_is_refused() -> None:
    # Streamed, the frame does not say its size: the decoder would need the
    # whole 128 MB window the header asks for.
    compressor = zstd.ZstdCompressor(options={zstd.CompressionParameter.window_log: 27})
    body = compressor.compress(b'{"a": 1}') + compressor.flush()
    with pytest.raises(MergeError, match="zstd"):
        codings.decode_body(body, "zstd", 10**6)
    within = zstd.ZstdCompressor(options={zstd.CompressionParameter.window_log: 23})
    body = within.compress(b'{"a": 1}') + within.flush()
    assert codings.decode_body(body, "zstd", 10**6) == b'{"a": 1}'


@pytest.mark.parametrize("body", [b"", b"not zstd at all", zstd.compress(b"{}") + b"junk"])
def test_a_body_that_is_not_zstd_is_an_error(body: bytes) -> None:
    with pytest.raises(MergeError):
        codings.decode_body(body, "zstd", 10**6)


# ------------------------------------------------ what is asked upstream


@pytest.mark.parametrize(
    ("accept", "asked"),
    [
        # Every coding decoded here: the client's header as it came.
        ("gzip, deflate, br, zstd", "gzip, deflate, br, zstd"),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", None),  # "*" expanded below instead
        ("", ""),
        # A coding not decoded here is left out; places and q-values kept.
        ("gzip, deflate, br, zstd, dcz", "gzip, deflate, br, zstd"),
        ("br;q=0.9, dcz;q=1, gzip;q=0.1", "br;q=0.9, gzip;q=0.1"),
        ("compress", "identity"),
        ("dcz, identity", "identity"),
        # Refusals are kept, and the client's own refusal of identity too.
        ("zstd;q=0, gzip", "zstd;q=0, gzip"),
        ("dcz, gzip;q=0", "gzip;q=0"),
        ("dcz, identity;q=0, gzip", "identity;q=0, gzip"),
        # "*": every decodable coding not named, with its q-value.
        ("*", "zstd, br, gzip, deflate, identity"),
        (
            "zstd;q=0, *;q=0.5",
            "zstd;q=0, br;q=0.5, gzip;q=0.5, deflate;q=0.5, identity;q=0.5",
        ),
        # Nothing decodable accepted, identity refused: asked as the client
        # asked (its answer passes unmerged), never a 406 the sidecar made.
        ("dcz, identity;q=0", "dcz, identity;q=0"),
        ("dcz, *;q=0", "dcz, *;q=0"),
        ("*;q=0", "*;q=0"),
    ],
)
def test_only_codings_decoded_here_are_asked_for(accept: str, asked: str | None) -> None:
    if asked is None:
        asked = "br;q=1.0, gzip;q=0.8, zstd;q=0.1, deflate;q=0.1, identity;q=0.1"
    assert codings.decodable_accept(accept) == asked


def test_no_accept_encoding_stays_none() -> None:
    assert codings.decodable_accept(None) is None


@pytest.mark.parametrize("accept", ["gzip;q=abc, dcz", ";;, ,dcz;q=", "x-gzip, dcz"])
def test_an_odd_accept_encoding_is_rewritten_never_an_error(accept: str) -> None:
    asked = codings.decodable_accept(accept)
    assert asked is not None and "dcz" not in asked
