"""Merging a snapshot into an upstream's JSON body. Pure: bytes in, bytes out.

The merge is ``(body bytes, key, snapshot) -> body bytes``:

* When the key does not occur in the body at all (gptme 0.31.0), the
  snapshot's pre-serialised bytes are inserted right after the object's
  opening brace: no parse, cost independent of the body's size. A JSON
  string can only contain the bytes ``"key"`` as a whole token (a quote
  inside a string is escaped), and the key can be spelt otherwise only with
  escapes of its own characters (``"sess\\u0069on"``): a body with none of
  those has no such key, and a body with one is parsed, so the answer has
  exactly one.
* Otherwise (gptme 0.35.1 has its own ``session``) the body is parsed, the
  sidecar's observed fields win over the upstream's, the upstream's other
  keys stay, and the body is serialised again.

A list (:func:`read_list`, then :func:`merge_list`) is always parsed: each
item the sidecar has observed gets the snapshot under the same key, merged
as a single GET's body would be (:func:`merge_object`); the other items, and
everything around them, keep their values.

The ETag of a merged answer is ``sidecar.http.etags``' rule; decoding and
re-encoding the body, ``sidecar.http.codings``'.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .profile import field_value
from .snapshot import Snapshot

__all__ = ["Listed", "MergeError", "merge", "merge_list", "merge_object", "read_list"]

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
    if not _may_hold(body, key, needle):
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


#: JSON's two-character escapes, by the character they stand for.
_SHORT_ESCAPES = {
    '"': b'\\"',
    "\\": b"\\\\",
    "/": b"\\/",
    "\b": b"\\b",
    "\f": b"\\f",
    "\n": b"\\n",
    "\r": b"\\r",
    "\t": b"\\t",
}


def _may_hold(body: bytes, key: str, needle: bytes) -> bool:
    """Whether ``key`` may be a key of the body: its plain bytes are in it,
    or, in a body with escapes, one of them stands for a character of it."""
    # rfind, not `in`: same answer, but CPython's reverse search is 2-3x
    # faster than its forward one on JSON text (bench/merge_cost.py).
    if body.rfind(needle) >= 0:
        return True
    # Most bodies have no backslash (one memchr); the others cost one more
    # scan (bench/merge_cost.py: "insert, escapes").
    return b"\\" in body and _key_escapes(key).search(body) is not None


@functools.lru_cache(maxsize=8)
def _key_escapes(key: str) -> re.Pattern[bytes]:
    """Any escape that stands for a character of ``key`` (``\\u0069``,
    ``\\u006E`` or ``\\u006e``...). Every alternative begins with a
    backslash, so the search runs on that literal prefix."""
    units = key.encode("utf-16-be")
    hexes = set()
    for i in range(0, len(units), 2):
        code = units[i : i + 2].hex()  # its hex digits in any case
        for spelt in itertools.product(*({c.lower(), c.upper()} for c in code)):
            hexes.add("".join(spelt).encode())
    forms = [rb"\\u(?:" + b"|".join(sorted(hexes)) + rb")"]
    forms += [re.escape(_SHORT_ESCAPES[c]) for c in set(key) if c in _SHORT_ESCAPES]
    return re.compile(b"|".join(forms))


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


@dataclass(frozen=True)
class Listed:
    """A list answer, parsed: the whole document and its items (in order)."""

    doc: Any
    #: The item objects, as they sit in ``doc`` (merging changes them there).
    items: list[dict[str, Any]]
    #: Parsed by the standard library (integers beyond 64 bits): written by it too.
    exact: bool

    def ids(self, id_field: str) -> list[str | None]:
        """Each item's id (None where it has no string id), in order."""
        out: list[str | None] = []
        for item in self.items:
            value = field_value(item, id_field)
            out.append(value if isinstance(value, str) and value else None)
        return out

    def newest(self, id_field: str, modified_field: str | None, n: int) -> list[str]:
        """The ids of the ``n`` most recently modified items (by ``modified_field``,
        a number; without one, the list's own order, which both gptme and
        opencode keep newest first)."""
        ids = self.ids(id_field)
        ranked = [(i, rid) for i, rid in enumerate(ids) if rid is not None]
        if modified_field is not None:

            def when(entry: tuple[int, str]) -> float:
                value = field_value(self.items[entry[0]], modified_field)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    return -math.inf  # no time: after every item that has one
                return float(value) if math.isfinite(value) else -math.inf

            ranked.sort(key=when, reverse=True)  # stable: ties keep the list's order
        return [rid for _, rid in ranked[:n]]


def read_list(body: bytes, items_field: str | None) -> Listed:
    """Parse a list answer: an array of items, or an object holding them under
    ``items_field``. Anything else raises :class:`MergeError`."""
    exact = _has_long_digit_run(body)
    try:
        doc = json.loads(body) if exact else orjson.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MergeError(f"body is not valid JSON: {exc}") from exc
    items = doc
    if isinstance(doc, dict) and items_field is not None:
        items = doc.get(items_field)
    if not isinstance(items, list):
        raise MergeError("body is not a list of items")
    return Listed(doc, [item for item in items if isinstance(item, dict)], exact)


def merge_list(
    listed: Listed, key: str, id_field: str, snapshots: Mapping[str, Snapshot]
) -> tuple[bytes | None, int]:
    """The list with each item whose id has a snapshot merged (as its GET
    would be), and how many items were; None for the body when none was (the
    upstream's bytes stand). Items without one are left as they are; an id
    listed twice is merged twice."""
    enriched = 0
    for item, resource_id in zip(listed.items, listed.ids(id_field), strict=True):
        snap = snapshots.get(resource_id) if resource_id is not None else None
        if snap is None:
            continue
        own = item.get(key)
        if own is None and not listed.exact:
            # No object of the upstream's own: the snapshot's bytes, serialised
            # once per change, go in as they are.
            item[key] = orjson.Fragment(snap.body)
        else:
            item[key] = merge_object(own, snap)
        enriched += 1
    if not enriched:
        return None, 0
    try:
        if listed.exact:
            out = json.dumps(listed.doc, ensure_ascii=False, allow_nan=False).encode()
        else:
            out = orjson.dumps(listed.doc)
    except (ValueError, TypeError, RecursionError) as exc:  # NaN in, say: not JSON out
        raise MergeError(f"body cannot be written back as JSON: {exc}") from exc
    return out, enriched
