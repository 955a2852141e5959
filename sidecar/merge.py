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
response carries ``W/"<upstream tag>;sc=<snapshot digest>"`` (with an empty
upstream part when the upstream sends no tag). An incoming
``If-None-Match`` is translated back: a tag whose digest is the current
snapshot's is forwarded as the upstream's tag; a tag with another digest is
dropped, so the upstream answers 200 and the client gets the new state. A
``304`` can therefore only happen when neither the body nor the snapshot
changed.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from typing import Any

import orjson

from .snapshot import Snapshot

try:  # brotli is optional: without it, br bodies pass through unmerged
    import brotli
except ImportError:  # pragma: no cover - exercised only without the extra
    brotli = None

__all__ = [
    "MergeError",
    "decode_body",
    "encode_body",
    "merge",
    "merged_etag",
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

_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')
_SUFFIX = re.compile(r'^"(.*);sc=([0-9a-f]+)"$')


def merged_etag(upstream_etag: str | None, snap: Snapshot) -> str:
    """The ETag of a merged response (always weak: the body is re-encoded).

    Without an upstream tag the upstream part is empty: such a tag lets a
    client long-poll on the state, but never earns a 304, since nothing then
    vouches for the body.
    """
    opaque = ""
    if upstream_etag:
        m = re.match(r'\s*(?:W/)?"([^"]*)"\s*$', upstream_etag)
        opaque = m.group(1) if m else upstream_etag.replace('"', "")
    return f'W/"{opaque};sc={snap.digest}"'


def translate_if_none_match(value: str, snap: Snapshot) -> str | None:
    """Turn a client's If-None-Match into what the upstream should see.

    Returns None when no tag can still match (the header is then dropped).
    """
    if value.strip() == "*":
        return value
    kept = []
    for weak, tag in _TAG.findall(value):
        m = _SUFFIX.match(tag)
        if m is None:
            kept.append(f"{weak}{tag}")  # not one of ours: leave it to the upstream
        elif m.group(2) == snap.digest and m.group(1):
            kept.append(f'W/"{m.group(1)}"')
    return ", ".join(kept) if kept else None


def etag_digests(value: str) -> set[str]:
    """The snapshot digests named by the sidecar's tags in an If-None-Match."""
    found = set()
    for _, tag in _TAG.findall(value):
        m = _SUFFIX.match(tag)
        if m is not None:
            found.add(m.group(2))
    return found


# --------------------------------------------------------- content codings


def supported_encoding(content_encoding: str) -> bool:
    coding = content_encoding.strip().lower()
    if coding in ("", "identity", "gzip", "x-gzip", "deflate"):
        return True
    return coding == "br" and brotli is not None


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """Undo one content coding; ``limit`` bounds the decoded size."""
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if coding != "deflate" else zlib.MAX_WBITS
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(body, limit + 1)
        except zlib.error:
            if coding != "deflate":
                raise
            d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send
            out = d.decompress(body, limit + 1)
        if len(out) > limit:
            raise MergeError("decoded body exceeds the merge limit")
        return out
    if coding == "br" and brotli is not None:
        out = brotli.decompress(body)
        if len(out) > limit:
            raise MergeError("decoded body exceeds the merge limit")
        return bytes(out)
    raise MergeError(f"unsupported content coding {content_encoding!r}")


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
