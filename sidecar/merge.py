"""Merging a snapshot into an upstream's JSON body, and the ETag rule. No I/O.

The merge is ``(body bytes, key, snapshot) -> body bytes``:

* When the key does not occur in the body at all (gptme 0.31.0), the
  snapshot's pre-serialised bytes are inserted right after the object's
  opening brace: no parse, cost independent of the body's size. A JSON
  string can only contain the bytes ``"key"`` as a whole token (a quote
  inside a string is escaped), so "not found" is exact.
* Otherwise (gptme 0.35.1 has its own ``session``) the body is parsed, the
  sidecar's observed fields win over the upstream's, the upstream's other
  keys stay, and the body is serialised again.

ETags: the upstream's tag covers its body, not the snapshot, so a merged
response carries ``W/"<upstream tag>;sc=<digest>"``: the digest covers the
snapshot and, when the upstream sends no tag, the resource's version as the
sidecar knows it (its content events) and the body's length. An incoming ``If-None-Match`` is
translated back: a tag whose digest is still current (served since the last
change of the snapshot or the resource) is forwarded as the upstream's tag;
a stale one is dropped, so the upstream answers 200 and the client gets the
new body. A ``304`` can therefore only happen when neither the body nor the
snapshot changed.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Container
from typing import Any

import orjson

from .snapshot import Snapshot

try:  # a dependency; should an install lack it, br bodies pass through unmerged
    import brotli
except ImportError:  # pragma: no cover
    brotli = None

__all__ = [
    "MergeError",
    "body_digest",
    "decode_body",
    "encode_body",
    "merge",
    "merged_etag",
    "parse_etags",
    "supported_encoding",
    "translate_if_none_match",
]

#: The opening brace of a JSON object and the first byte after it.
_OPENING = re.compile(rb"[ \t\r\n]*(\{)[ \t\r\n]*(.?)", re.S)
#: Maps every digit to b"0" and every other byte to b"x": a fast way to find
#: digit runs long enough to be an integer beyond 64 bits.
_DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= i <= 0x39 else 0x78 for i in range(256))


class MergeError(ValueError):
    """The body is not a JSON object; it is passed through unchanged."""


def merge(body: bytes, key: str, snap: Snapshot) -> bytes:
    needle = orjson.dumps(key)
    opening = _OPENING.match(body)
    if opening is None:
        raise MergeError("body is not a JSON object")
    # rfind, not `in`: same answer, but CPython's reverse search is 2-3x faster
    # than its forward one on JSON text (bench/merge_cost.py shows both).
    if body.rfind(needle) < 0:
        brace = opening.start(1)
        sep = b"" if opening.group(2) == b"}" else b","  # "{}" stays valid
        rest = memoryview(body)[brace + 1 :]  # no copy: joined once below
        return b"".join((body[:brace], b"{", needle, b":", snap.body, sep, rest))
    if _has_long_digit_run(body):
        return _merge_slowly(body, key, snap)  # orjson would turn big integers into floats
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _merge_slowly(body, key, snap)
    if not isinstance(doc, dict):
        raise MergeError("body is not a JSON object")
    doc[key] = merge_object(doc.get(key), snap)
    return orjson.dumps(doc)


def _has_long_digit_run(body: bytes) -> bool:
    """True if 19 digits follow each other: possibly an integer beyond 64 bits."""
    return body.translate(_DIGITS_TO_ZERO).find(b"0" * 19) >= 0


def _merge_slowly(body: bytes, key: str, snap: Snapshot) -> bytes:
    """The standard library's parser: it also takes integers beyond 64 bits."""
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise MergeError("body is not a JSON object")
        doc[key] = merge_object(doc.get(key), snap)
        return json.dumps(doc, ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, RecursionError) as exc:
        raise MergeError(f"body is not valid JSON: {exc}") from exc


def merge_object(upstream: Any, snap: Snapshot) -> dict[str, Any]:
    """The upstream's own object under the key, with the observed fields on top."""
    if not isinstance(upstream, dict):
        return snap.as_dict()
    merged = dict(upstream)
    merged.update(snap.observed())
    for name, value in snap.as_dict().items():
        merged.setdefault(name, value)
    return merged


# ------------------------------------------------------------------ ETags


def parse_etags(value: str) -> list[tuple[bool, str]]:
    """The entity tags of an ``If-None-Match`` list: (weak, quoted tag) pairs.

    A single left-to-right scan (RFC 9110 section 8.8.3): linear in the
    header's length whatever it holds. Anything that is not a tag is skipped.
    """
    tags = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in " \t,":
            i += 1
            continue
        weak = value.startswith("W/", i)
        if weak:
            i += 2
        if i < n and value[i] == '"':
            close = value.find('"', i + 1)
            if close < 0:
                break
            tags.append((weak, value[i : close + 1]))
            i = close + 1
        else:
            comma = value.find(",", i)
            i = n if comma < 0 else comma + 1  # not a tag: skip to the next item
    return tags


def _ours(tag: str) -> tuple[str, str] | None:
    """(upstream part, digest) of a sidecar tag such as ``"abc;sc=0f1e"``."""
    inner = tag[1:-1]
    head, sep, digest = inner.rpartition(";sc=")
    if not sep or not digest or not all(c in "0123456789abcdef" for c in digest):
        return None
    return head, digest


def _opaque(upstream_etag: str | None) -> str:
    if not upstream_etag:
        return ""
    tags = parse_etags(upstream_etag)
    return tags[0][1][1:-1] if tags else upstream_etag.replace('"', "")


def body_digest(
    upstream_etag: str | None, snap: Snapshot, version: str, upstream_length: int | None
) -> str:
    """The digest in a merged ETag: it changes whenever the body served does.

    The upstream's tag covers its body and the snapshot's digest covers the
    merged part. Without an upstream tag (gptme 0.31.0), ``version`` stands
    for the body: the registry's count of the resource's changes (every
    content event bumps it) with a nonce of this process, and the body's
    length. Hashing the body instead cost 20% of the enrich GET's throughput
    at 64 KiB, and it would tell nothing more: a long-poll is held before the
    body is fetched, on the events the sidecar has seen.
    """
    if _opaque(upstream_etag) or upstream_length is None:
        return snap.digest
    return f"{snap.digest[:12]}{version}{upstream_length:x}"


def merged_etag(upstream_etag: str | None, digest: str) -> str:
    """The ETag of a merged response (always weak: the body is re-encoded).

    Without an upstream tag the upstream part is empty: such a tag lets a
    client long-poll, but never earns a 304, since nothing then vouches for
    the body upstream.
    """
    return f'W/"{_opaque(upstream_etag)};sc={digest}"'


def translate_if_none_match(value: str, current: Container[str]) -> str | None:
    """Turn a client's If-None-Match into what the upstream should see.

    One of the sidecar's tags is forwarded as the upstream's own tag only if
    its digest is ``current`` (served since the last change); a stale one is
    dropped, so the upstream answers 200 and the client gets the new body.
    Returns None when no tag is left (the header is then dropped).
    """
    if value.strip() == "*":
        return value
    kept = []
    for weak, tag in parse_etags(value):
        ours = _ours(tag)
        if ours is None:
            kept.append(f"W/{tag}" if weak else tag)  # not ours: the upstream's to judge
        elif ours[1] in current and ours[0]:
            kept.append(f'W/"{ours[0]}"')
    return ", ".join(kept) if kept else None


def etag_digests(value: str) -> set[str]:
    """The digests named by the sidecar's tags in an If-None-Match."""
    found = set()
    for _, tag in parse_etags(value):
        ours = _ours(tag)
        if ours is not None:
            found.add(ours[1])
    return found


# --------------------------------------------------------- content codings


def supported_encoding(content_encoding: str) -> bool:
    coding = content_encoding.strip().lower()
    if coding in ("", "identity", "gzip", "x-gzip", "deflate"):
        return True
    return coding == "br" and brotli is not None


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """Undo one content coding; more than ``limit`` bytes out is a MergeError.

    Decoding is incremental and bounded as the output grows: a small bomb
    (a 195 KB brotli body that inflates to 1.5 GB) costs ``limit`` bytes at
    most, never its full size. A gzip body of several members (RFC 1952
    allows it) is decoded whole; a truncated body is an error, not a short
    document.
    """
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip"):
        return _inflate(body, 16 + zlib.MAX_WBITS, limit, members=True)
    if coding == "deflate":
        try:
            return _inflate(body, zlib.MAX_WBITS, limit, members=False)
        except zlib.error:  # raw deflate, as some servers send it
            return _inflate(body, -zlib.MAX_WBITS, limit, members=False)
    if coding == "br" and brotli is not None:
        return _unbrotli(body, limit)
    raise MergeError(f"unsupported content coding {content_encoding!r}")


def _too_large() -> MergeError:
    return MergeError("decoded body exceeds the merge limit")


def _inflate(body: bytes, wbits: int, limit: int, members: bool) -> bytes:
    out = bytearray()
    data = body
    while True:
        d = zlib.decompressobj(wbits)
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit or d.unconsumed_tail:
            raise _too_large()
        if not d.eof:
            raise MergeError("truncated compressed body")
        data = d.unused_data
        if not members or not data.strip(b"\0"):
            return bytes(out)  # (trailing zeros: padding some servers add)


def _unbrotli(body: bytes, limit: int) -> bytes:
    assert brotli is not None
    d = brotli.Decompressor()
    out = bytearray()
    data = body
    while True:
        out += d.process(data, output_buffer_limit=limit + 1 - len(out))
        data = b""
        if len(out) > limit:
            raise _too_large()
        if d.is_finished():
            return bytes(out)
        if d.can_accept_more_data():
            raise MergeError("truncated compressed body")


def encode_body(body: bytes, content_encoding: str) -> bytes:
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(body, compresslevel=5, mtime=0)
    if coding == "deflate":
        return zlib.compress(body, 5)
    if coding == "br" and brotli is not None:
        return bytes(brotli.compress(body, quality=4))
    raise MergeError(f"unsupported content coding {content_encoding!r}")
