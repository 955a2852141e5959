"""Request paths as the upstream reads them.

The sidecar decides what a request is (an enrich GET, a trigger, a write that
makes cached bodies stale) from its path; the upstream decides what it does.
If the two read a path differently, a client can pick a spelling that the
upstream serves as ``DELETE .../conversations/X`` while the sidecar sees an
unknown path: the cache keeps serving X, a step starts unwatched. So every
rule is matched against the path *as the profile's upstream routes it*
(:meth:`PathRules.normalise`), and the request itself goes upstream exactly
as the client sent it.

The canonical form is RFC 3986 section 6.2.2's: every segment
percent-decoded, then encoded again with upper-case hex, unreserved
characters and sub-delimiters as themselves. The upstream's own reading
comes before it, in this order (the ``[paths]`` table of a profile):

1. the fragment (``#...``) is dropped (neither upstream routes on it);
2. ``semicolon = "ends-path"``: ``;`` ends the path, as ``?`` does;
3. ``leading_slashes = "merge"``: ``//a`` is ``/a``;
4. ``decode_slashes``: ``%2F`` is a separator (a WSGI server decodes the
   whole path before routing), or stays inside its segment;
5. ``empty_segments = "ignore"``: ``a//b`` is ``a/b`` and a trailing ``/``
   is dropped;
6. ``dot_segments = "remove"``: ``.`` and ``..`` (decoded) are resolved;
7. ``case_sensitive = false``: the profile's fixed segments match in any
   case (ids never do; see :class:`sidecar.profile.PathTemplate`).

A segment that is not UTF-8 once decoded (``%FF``, ``%C0%AE``,
``%ED%A0%80``) is read with U+FFFD in its place, as Werkzeug does, and the
path is marked inexact: no rule that builds a URL of the sidecar's own or
opens a stream acts on it (the request passes through as sent), but a write
to it still makes the resource's cached bodies stale.

What the released servers do, measured (``tests/test_real_paths.py``):

================================  ===========================  ========================
spelling                          gptme 0.31.0 / 0.35.1         opencode 1.18.33
================================  ===========================  ========================
``%73``, ``%6f`` / ``%6F``        decoded                      decoded
``%2F``                           a separator                  inside its segment
``//`` leading / inside           merged / not routed           merged / merged
trailing ``/``                    not routed                   ignored
``.``, ``..``, ``%2e%2e``         not resolved (not routed)     not resolved (not routed)
``;x``                            part of the segment           ends the path
``#x``                            dropped                      dropped
upper case fixed segment          not routed                   routed
``%FF`` in an id                  read as U+FFFD                not a session (404)
================================  ===========================  ========================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

__all__ = ["PathRules"]

#: RFC 3986's pchar without "%": kept as themselves in the canonical form
#: (unreserved characters are always kept by ``quote``).
_PCHAR = "!$&'()*+,;=:@"
#: A character a canonical path does not hold as itself ("%", "#", "?" included).
_NOT_CANONICAL = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/]")


@dataclass(frozen=True, slots=True)
class PathRules:
    """How one upstream routes a request path (a profile's ``[paths]``)."""

    decode_slashes: bool = False
    merge_leading_slashes: bool = False
    ignore_empty_segments: bool = False
    remove_dot_segments: bool = False
    semicolon_ends_path: bool = False
    case_sensitive: bool = True

    def normalise(self, raw_path: str) -> tuple[str, bool]:
        """The canonical path (no query) and whether it is exact (every
        segment UTF-8). ``raw_path`` is the path as the client sent it."""
        path = raw_path
        if self._plain(path):
            return path, True
        path = path.partition("#")[0]
        if self.semicolon_ends_path:
            path = path.partition(";")[0]
        if self.merge_leading_slashes and path.startswith("//"):
            path = "/" + path.lstrip("/")
        exact = True
        if self.decode_slashes:
            text, exact = _decode(path)
            segments = text.split("/")
        else:
            segments = []
            for raw in path.split("/"):
                text, ok = _decode(raw)
                exact = exact and ok
                segments.append(text)
        if self.ignore_empty_segments:
            segments = segments[:1] + [s for s in segments[1:] if s]
        if self.remove_dot_segments:
            segments = _without_dots(segments)
        return "/".join(quote(s, safe=_PCHAR) for s in segments), exact

    def _plain(self, path: str) -> bool:
        """The path is already canonical for this upstream (most requests)."""
        if "//" in path or _NOT_CANONICAL.search(path) is not None:
            return False
        if self.semicolon_ends_path and ";" in path:
            return False
        if self.ignore_empty_segments and path.endswith("/") and path != "/":
            return False
        if self.remove_dot_segments and "/." in path:
            return False
        return True


def _decode(text: str) -> tuple[str, bool]:
    """Percent-decoded as UTF-8; (with U+FFFD, False) where it is not."""
    if "%" not in text and text.isascii():
        return text, True
    raw = unquote_to_bytes(text.encode("utf-8", "surrogateescape"))
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), False


def _without_dots(segments: list[str]) -> list[str]:
    """RFC 3986 section 5.2.4 on decoded segments (the first is the root's "")."""
    out: list[str] = []
    for segment in segments[1:]:
        if segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # "/a/b/.." is "/a/", a directory
    return segments[:1] + out
