"""Entity tags of merged answers: the upstream's tag with the snapshot's digest. No I/O.

The upstream's tag covers its body, not the snapshot, so a merged response
carries ``W/"<upstream tag>;sc=<digest>"``: the digest covers the snapshot
and, when the upstream sends no tag, the resource's version as the sidecar
knows it (its content events) and the body's length. An incoming
``If-None-Match`` is translated back: a tag whose digest is still current
(served since the last change of the snapshot or the resource) is forwarded
as the upstream's tag; a stale one is dropped, so the upstream answers 200
and the client gets the new body. A ``304`` can therefore only happen when
neither the body nor the snapshot changed.
"""

from __future__ import annotations

import functools
from collections.abc import Container

from ..core.snapshot import Snapshot

__all__ = [
    "body_digest",
    "etag_digests",
    "has_upstream_tag",
    "merged_etag",
    "parse_etags",
    "translate_if_none_match",
]


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


@functools.lru_cache(maxsize=256)
def _opaque(upstream_etag: str | None) -> str:
    """The upstream tag's opaque part: its first tag's, unquoted. Remembered
    for the last 256 tags (a cache hit asks again for the same entry's tag;
    at most 256 heads' worth of text, 2 MiB for tags of aiohttp's 8 KiB
    field limit)."""
    if not upstream_etag:
        return ""
    tags = parse_etags(upstream_etag)
    return tags[0][1][1:-1] if tags else upstream_etag.replace('"', "")


def has_upstream_tag(upstream_etag: str | None) -> bool:
    """Whether the upstream sent a tag of its own (which then covers its body)."""
    return bool(_opaque(upstream_etag))


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
