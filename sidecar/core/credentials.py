"""Credentials: every way a request authenticates to the upstream, and their fingerprints.

The profile names them (``[credentials]``: gptme 0.35.1 reads ``Authorization``,
its cookie and ``?token=``; opencode 1.18.33 HTTP Basic in ``Authorization`` or
the same in ``?auth_token=``). Whatever the upstream reads to tell clients
apart, the sidecar must tell them apart by too, or it mixes them up: a cached
answer, a held long-poll or a conversation's "the upstream let these in" set
would be shared by a client with a token in its query and one without any.

So this module is the one place that reads them. :meth:`CredentialRules.of`
takes a request's credentials (the named headers, except those its
``Connection`` header makes hop-by-hop, and the named query parameters, as
sent); a :class:`Credentials` is what the sidecar's own subscription then
authenticates with, and its :attr:`~Credentials.fingerprint` (a SHA-256 of
them) is what everything else compares. The fingerprint tells credentials
apart without keeping them: a subscription keeps the credentials themselves
only while it runs, and they go only to the configured upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["NO_CREDENTIALS", "CredentialRules", "Credentials", "connection_tokens"]

#: What a profile without ``[credentials]`` reads: the two headers that
#: carry credentials by HTTP's own rules (RFC 9110 section 11.6.2, RFC 6265).
DEFAULT_HEADERS = ("Authorization", "Cookie")


def connection_tokens(headers: Mapping[str, str]) -> set[str]:
    """The header names a message's ``Connection`` lists: hop-by-hop, never forwarded."""
    if "Connection" not in headers:
        return set()
    values = (
        headers.getall("Connection", ())
        if isinstance(headers, CIMultiDictProxy | CIMultiDict)
        else [headers["Connection"]]
    )
    tokens = {token.strip().lower() for value in values for token in value.split(",")}
    tokens.discard("")
    return tokens


class Credentials(dict[str, str]):
    """The credential headers of a request (name: value, as sent), and its
    credential query parameters (``name=value`` as sent) in :attr:`query`.

    A mapping of headers, so a subscription sends it as it would any header.
    """

    __slots__ = ("_fingerprint", "query")

    def __init__(self, headers: Iterable[tuple[str, str]] = (), query: tuple[str, ...] = ()):
        super().__init__(headers)
        self.query = query
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _digest(sorted(self.items()), self.query)
        return self._fingerprint

    def clear(self) -> None:
        super().clear()
        self.query = ()

    def with_query(self, raw_path_qs: str) -> str:
        """A target of the sidecar's own, carrying the query credentials too."""
        if not self.query:
            return raw_path_qs
        sep = "&" if "?" in raw_path_qs else "?"
        return raw_path_qs + sep + "&".join(self.query)


def _digest(headers: list[tuple[str, str]], query: tuple[str, ...]) -> str:
    return hashlib.sha256(repr((headers, sorted(query))).encode()).hexdigest()


NO_CREDENTIALS = Credentials()
_NONE = NO_CREDENTIALS.fingerprint


@dataclass(frozen=True)
class CredentialRules:
    """What an upstream authenticates a request by (a profile's ``[credentials]``)."""

    headers: tuple[str, ...] = DEFAULT_HEADERS
    query: tuple[str, ...] = ()

    def of(self, headers: Mapping[str, str], target: str = "") -> Credentials:
        """The credentials a client request carries to the upstream."""
        if not self._carries(headers, target):
            return NO_CREDENTIALS
        named = connection_tokens(headers)
        found = []
        for name in self.headers:
            if name in headers and name.lower() not in named:
                values = (
                    headers.getall(name)
                    if isinstance(headers, CIMultiDictProxy | CIMultiDict)
                    else [headers[name]]
                )
                found.append((name, ("; " if name.lower() == "cookie" else ", ").join(values)))
        return Credentials(found, self._query(target))

    def fingerprint(self, headers: Mapping[str, str], target: str = "") -> str:
        """The fingerprint of :meth:`of`, with no work for a request that carries none."""
        if not self._carries(headers, target):
            return _NONE
        return self.of(headers, target).fingerprint

    def _carries(self, headers: Mapping[str, str], target: str) -> bool:
        if any(name in headers for name in self.headers):
            return True
        return bool(self.query) and "?" in target

    def _query(self, target: str) -> tuple[str, ...]:
        if not self.query:
            return ()
        query = target.partition("?")[2].partition("#")[0]
        if not query:
            return ()
        wanted = self.query
        # As a form (Werkzeug's request.args, URLSearchParams): "+" is a space.
        return tuple(
            pair
            for pair in query.split("&")
            if pair and unquote_plus(pair.partition("=")[0], errors="replace") in wanted
        )
