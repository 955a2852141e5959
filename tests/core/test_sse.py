"""The SSE decoder against the WHATWG rules, case by case, and under any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.sse import EventDecoder, ServerSentEvent


def decode(*chunks: bytes, **kwargs: int) -> list[ServerSentEvent]:
    decoder = EventDecoder(**kwargs)
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def datas(*chunks: bytes) -> list[str]:
    return [e.data for e in decode(*chunks)]


# (name, stream, expected data of each dispatched event)
SPEC_CASES = [
    ("lf line ends", b"data: a\n\ndata: b\n\n", ["a", "b"]),
    ("crlf line ends", b"data: a\r\n\r\ndata: b\r\n\r\n", ["a", "b"]),
    ("cr line ends", b"data: a\r\rdata: b\r\r", ["a", "b"]),
    ("mixed line ends", b"data: a\r\n\ndata: b\r\rdata: c\n\r\n", ["a", "b", "c"]),
    ("one leading space stripped", b"data:  two spaces\n\n", [" two spaces"]),
    ("no space after colon", b"data:tight\n\n", ["tight"]),
    ("multi-line data joined by LF", b"data: a\ndata: b\n\n", ["a\nb"]),
    ("empty data line is an empty event", b"data\n\n", [""]),
    ("data with empty value then text", b"data:\ndata: x\n\n", ["\nx"]),
    ("comment ignored", b": keep-alive\ndata: a\n\n", ["a"]),
    ("only comments dispatch nothing", b": hi\n\n", []),
    ("unknown field ignored", b"foo: bar\ndata: a\n\n", ["a"]),
    ("field without colon", b"data\ndata\n\n", ["\n"]),
    ("no data: nothing dispatched", b"event: x\n\n", []),
    ("BOM at stream start stripped", b"\xef\xbb\xbfdata: a\n\n", ["a"]),
    ("only one BOM stripped", b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", []),
    ("invalid UTF-8 replaced", b"data: \xff\xfe ok\n\n", ["\ufffd\ufffd ok"]),
    ("truncated UTF-8 replaced", b"data: caf\xc3\n\n", ["caf\ufffd"]),
    ("unterminated event discarded at end", b"data: a\n\ndata: b\n", ["a"]),
    ("colon in value kept", b"data: a:b: c\n\n", ["a:b: c"]),
    ("NUL in data kept", b"data: a\x00b\n\n", ["a\x00b"]),
]


@pytest.mark.parametrize(("name", "stream", "expected"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_spec_case(name: str, stream: bytes, expected: list[str]) -> None:
    assert datas(stream) == expected
    # The same stream fed one byte at a time gives the same events.
    assert datas(*(stream[i : i + 1] for i in range(len(stream)))) == expected


def test_event_type_defaults_to_message_and_resets() -> None:
    events = decode(b"event: ping\ndata: 1\n\ndata: 2\n\n")
    assert [(e.event, e.data) for e in events] == [("ping", "1"), ("message", "2")]


def test_id_persists_and_id_with_nul_is_ignored() -> None:
    decoder = EventDecoder()
    events = decoder.feed(b"id: 7\ndata: a\n\ndata: b\n\nid: 8\x00\ndata: c\n\n")
    assert [e.id for e in events] == ["7", "7", "7"]
    assert decoder.last_event_id == "7"


def test_empty_id_resets_last_event_id() -> None:
    decoder = EventDecoder()
    decoder.feed(b"id: 5\ndata: a\n\nid\ndata: b\n\n")
    assert decoder.last_event_id == ""


def test_id_without_data_still_updates_last_event_id() -> None:
    decoder = EventDecoder()
    assert decoder.feed(b"id: 9\n\n") == []
    assert decoder.last_event_id == "9"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"retry: 3000", 3000),
        (b"retry: 30s", None),
        (b"retry: -1", None),
        (b"retry:", None),
        (b"retry: \xd9\xa3", None),
    ],  # an Arabic-Indic digit is not an ASCII digit
)
def test_retry_accepts_ascii_digits_only(line: bytes, expected: int | None) -> None:
    decoder = EventDecoder()
    decoder.feed(line + b"\n\n")
    assert decoder.retry == expected


def test_cr_and_lf_split_across_chunks_is_one_line_end() -> None:
    assert datas(b"data: a\r", b"\n", b"\r", b"\ndata: b\r\n\r\n") == ["a", "b"]


def test_bom_split_across_chunks() -> None:
    assert datas(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == ["a"]


def test_reset_discards_partial_event_but_keeps_id_and_retry() -> None:
    decoder = EventDecoder()
    decoder.feed(b"id: 3\nretry: 1500\ndata: done\n\ndata: half")
    decoder.reset()
    assert decoder.feed(b"data: fresh\n\n") == [ServerSentEvent("fresh", "message", "3", 1500)]
    assert decoder.last_event_id == "3"


def test_reset_allows_a_bom_on_the_new_stream() -> None:
    decoder = EventDecoder()
    decoder.feed(b"data: a\n\n")
    decoder.reset()
    assert [e.data for e in decoder.feed(b"\xef\xbb\xbfdata: b\n\n")] == ["b"]


def test_oversized_event_is_dropped_and_counted_then_decoding_resumes() -> None:
    decoder = EventDecoder(max_event_bytes=1024)
    huge = b"data: " + b"x" * 10_000 + b"\n\n"
    events = []
    for i in range(0, len(huge), 333):  # chunked, the line spans many chunks
        events += decoder.feed(huge[i : i + 333])
    events += decoder.feed(b"data: after\n\n")
    assert [e.data for e in events] == ["after"]
    assert decoder.oversized == 1


def test_oversized_event_made_of_many_lines() -> None:
    decoder = EventDecoder(max_event_bytes=100)
    stream = b"".join(b"data: 0123456789\n" for _ in range(20)) + b"\ndata: ok\n\n"
    assert [e.data for e in decoder.feed(stream)] == ["ok"]
    assert decoder.oversized == 1


def test_ten_mebibyte_line_keeps_memory_bounded() -> None:
    decoder = EventDecoder(max_event_bytes=64 * 1024)
    chunk = b"y" * 65536
    decoder.feed(b"data: ")
    for _ in range(160):
        assert decoder.feed(chunk) == []
        assert decoder._pending_len <= 64 * 1024
    assert [e.data for e in decoder.feed(b"\n\ndata: next\n\n")] == ["next"]


# ------------------------------------------------------------ properties

_lines = st.lists(
    st.one_of(
        st.builds(
            lambda s: b"data: " + s,
            st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        ),
        st.sampled_from([b"", b": comment", b"event: x", b"id: 1", b"retry: 10", b"data"]),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    lines=_lines,
    ends=st.lists(st.sampled_from([b"\n", b"\r", b"\r\n"]), min_size=30, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_any_chunking_yields_the_same_events(
    lines: list[bytes], ends: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(line + end for line, end in zip(lines, ends, strict=False))
    whole = decode(stream)
    points = sorted({c for c in cuts if c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert decode(*pieces) == whole


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=300))
def test_arbitrary_bytes_never_raise_and_chunking_is_irrelevant(stream: bytes, cut: int) -> None:
    assert decode(stream[:cut], stream[cut:]) == decode(stream)
