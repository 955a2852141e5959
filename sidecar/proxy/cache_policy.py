"""What the response cache may store and reuse: RFC 9111's rules for a shared cache.

The response cache (:mod:`sidecar.cache`) serves many clients, so it is a
*shared* cache in RFC 9111's sense, and keeps its rules, with two exceptions
argued in the README ("The response cache"):

* the upstream's ``no-cache`` (and a stale answer's need to be validated)
  is met by the events: while the resource's stream is live and no content
  event or write came, the body is known unchanged, which is what a
  revalidation would ask the upstream;
* an answer to a request with ``Authorization`` (section 3.5) is stored,
  but reused only for the same credentials (every credential the upstream
  reads is in the key, as a fingerprint) and only while the upstream has
  not refused them for that resource: a private cache per credential.

What this module decides, and nothing else (when an entry may answer is in
:mod:`sidecar.proxy`):

* :func:`storable`: whether a 200 may be kept, and how long the upstream
  says it stays fresh (``s-maxage`` over ``max-age`` over ``Expires``,
  section 4.2.1). ``no-store``, ``private`` (section 5.2.2.7: a shared cache
  must not store it, whatever the key), ``Set-Cookie``, ``Vary: *``, and a
  ``Vary`` on a header the sidecar makes per connection are never kept.
  ``must-revalidate`` and ``proxy-revalidate`` make the upstream's
  freshness binding: once stale, such an answer is validated by the
  upstream itself (a conditional request), never by the events alone.
* :func:`asked`: the request's own directives (``no-cache``,
  ``Pragma: no-cache``, ``max-age``, ``no-store``, ``only-if-cached``).
* :func:`key`: everything of the request that can change the body (section
  4.1): the target as sent, the credentials' fingerprint, ``Accept-Encoding``,
  and what the upstream reads to build absolute URLs (``Host``, which the
  sidecar forwards as ``X-Forwarded-Host``, ``Forwarded``,
  ``X-Forwarded-Host``/``-Prefix``/``-Port`` as the client sent them). A key
  longer than :data:`MAX_KEY_BYTES` is not cached: the request goes upstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

__all__ = ["MAX_KEY_BYTES", "Asked", "Storable", "asked", "directives", "key", "storable"]

#: The longest key cached: an enrich target with a long query is asked for
#: upstream each time instead (an entry's key is memory too, and counted).
MAX_KEY_BYTES = 4096
#: Request headers in the key, besides the target and the fingerprint.
KEY_HEADERS = (
    "Accept-Encoding",
    "Host",
    "X-Forwarded-Host",
    "Forwarded",
    "X-Forwarded-Prefix",
    "X-Forwarded-Port",
)
#: Request headers the sidecar sets per connection (section 4.1: an answer
#: that varies on one cannot be reused for another client).
PER_CONNECTION = frozenset({"x-forwarded-for", "x-forwarded-proto", "via", "x-real-ip"})


def directives(values: Iterable[str]) -> dict[str, str | None]:
    """``Cache-Control`` directives (RFC 9111 section 5.2), names lower case.

    A list of ``token [ "=" ( token / quoted-string ) ]``; a quoted string
    may hold commas (``private="Set-Cookie, X-Token"``). Of a directive given
    twice, the first counts.
    """
    found: dict[str, str | None] = {}
    for value in values:
        i, n = 0, len(value)
        while i < n:
            while i < n and value[i] in " \t,":
                i += 1
            start = i
            while i < n and value[i] not in "=, \t":
                i += 1
            name = value[start:i].lower()
            while i < n and value[i] in " \t":
                i += 1
            argument: str | None = None
            if i < n and value[i] == "=":
                i += 1
                while i < n and value[i] in " \t":
                    i += 1
                if i < n and value[i] == '"':
                    close = value.find('"', i + 1)
                    while close > 0 and value[close - 1] == "\\":
                        close = value.find('"', close + 1)
                    end = n if close < 0 else close
                    argument = value[i + 1 : end].replace("\\", "")
                    i = end + 1
                else:
                    start = i
                    while i < n and value[i] not in ", \t":
                        i += 1
                    argument = value[start:i]
            while i < n and value[i] != ",":
                i += 1  # anything else up to the next directive is not one
            if name and name not in found:
                found[name] = argument
    return found


def _seconds(argument: str | None) -> float | None:
    """A delta-seconds argument (section 1.2.2), or None if it is not one."""
    if argument is None or not argument.isdigit():
        return None
    return float(min(int(argument), 2**31))


@dataclass(frozen=True, slots=True)
class Storable:
    """A 200 the cache may keep, and how the upstream bounds its reuse."""

    #: Seconds the upstream says it stays fresh for a shared cache; None: it said nothing.
    lifetime: float | None
    #: must-revalidate / proxy-revalidate: once stale, only the upstream validates it.
    strict: bool
    #: Its age when it arrived (the upstream's ``Age``).
    initial_age: float
    #: Request headers it varies on (lower case), besides those in the key.
    vary: tuple[str, ...]


def storable(
    status: int, headers: Any, in_key: frozenset[str], now: float | None = None
) -> Storable | str:
    """How a response may be kept (RFC 9111 section 3), or why it may not."""
    if status != 200:
        return "status"
    cc = directives(headers.getall("Cache-Control", ()))
    if "no-store" in cc:
        return "no_store"
    if "private" in cc:
        return "private"
    if "Set-Cookie" in headers:
        return "set_cookie"  # an answer for one client, whatever its credentials
    names = [n.strip().lower() for v in headers.getall("Vary", ()) for n in v.split(",")]
    if "*" in names:
        return "vary"
    if PER_CONNECTION.intersection(names):
        return "vary"
    vary = tuple(n for n in dict.fromkeys(names) if n and n not in in_key)
    return Storable(
        lifetime=_lifetime(cc, headers, time.time() if now is None else now),
        strict="must-revalidate" in cc or "proxy-revalidate" in cc,
        initial_age=_seconds(headers.get("Age")) or 0.0,
        vary=vary,
    )


def _lifetime(cc: dict[str, str | None], headers: Any, now: float) -> float | None:
    """Section 4.2.1: s-maxage (a shared cache's), else max-age, else Expires."""
    for name in ("s-maxage", "max-age"):
        if name in cc:
            seconds = _seconds(cc[name])
            return 0.0 if seconds is None else seconds  # an invalid one: stale at once
    expires = headers.get("Expires")
    if expires is None:
        return None
    try:
        at = parsedate_to_datetime(expires).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0  # section 5.3: an invalid date is a time in the past
    date = headers.get("Date")
    try:
        base = parsedate_to_datetime(date).timestamp() if date else now
    except (TypeError, ValueError, IndexError, OverflowError):
        base = now
    return max(0.0, at - base)


@dataclass(frozen=True, slots=True)
class Asked:
    """A request's own cache directives (RFC 9111 section 5.2.1)."""

    no_cache: bool = False
    no_store: bool = False
    #: The oldest answer the client takes, in seconds.
    max_age: float | None = None
    only_if_cached: bool = False


_PLAIN = Asked()


def asked(headers: Mapping[str, str]) -> Asked:
    if "Cache-Control" not in headers and "Pragma" not in headers:
        return _PLAIN  # most polls
    getall = getattr(headers, "getall", None)
    values = getall("Cache-Control", ()) if getall else [headers.get("Cache-Control", "")]
    cc = directives(values)
    pragmas = getall("Pragma", ()) if getall else [headers.get("Pragma", "")]
    max_age = _seconds(cc["max-age"]) if "max-age" in cc else None
    return Asked(
        # Pragma counts only without Cache-Control (section 5.4).
        no_cache="no-cache" in cc or max_age == 0 or (not cc and "no-cache" in directives(pragmas)),
        no_store="no-store" in cc,
        max_age=max_age,
        only_if_cached="only-if-cached" in cc,
    )


def key(target: str, fingerprint: str, headers: Mapping[str, str]) -> tuple[str, ...]:
    """The cache key of a request (see the module's docstring)."""
    getall = getattr(headers, "getall", None)
    parts = [target, fingerprint]
    for name in KEY_HEADERS:
        if name not in headers:
            parts.append("")
        elif getall is not None:
            parts.append("\n".join(getall(name)))
        else:
            parts.append(headers[name])
    return tuple(parts)
