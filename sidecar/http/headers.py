"""Header rules, each in one place: what a hop adds and removes, credentials, preferences.

* **Hop-by-hop** headers (RFC 9110 section 7.6.1, and whatever ``Connection``
  names) are never forwarded, either way (:func:`request_headers`,
  :func:`response_headers`); ``X-Forwarded-*`` and ``Via`` are added.
* **Credentials** are the profile's to name (``sidecar.core.credentials``);
  the ``Connection`` header's tokens are read there too.
* **Preferences**: ``Prefer: wait`` (RFC 7240); ``Cache-Control`` is the
  cache's to read (``sidecar.proxy.cache_policy``).

No I/O: values in, values out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..core.credentials import connection_tokens

if TYPE_CHECKING:
    from .client import UpstreamResponse

__all__ = [
    "HOP_BY_HOP",
    "append_via",
    "connection_tokens",
    "dropped",
    "is_json",
    "prefer_wait",
    "relayable_reason",
    "request_headers",
    "response_headers",
]


class Request(Protocol):
    """What the forwarding headers are made of (an ``Exchange`` is one)."""

    remote: str | None
    scheme: str

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def version(self) -> Any: ...


# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers not forwarded: hop-by-hop, the Host (rewritten), and
#: Expect (the sidecar answers ``100-continue`` itself, then streams).
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect"}


def dropped(headers: CIMultiDictProxy[str], always: frozenset[str]) -> frozenset[str]:
    """``always``, plus the headers the message's ``Connection`` names (hop-by-hop too)."""
    tokens = connection_tokens(headers)
    return always | tokens if tokens else always


def request_headers(
    exchange: Request, upstream: URL, preserve_host: bool, via: str
) -> CIMultiDict[str]:
    """The headers sent upstream: the client's, less hop-by-hop, plus forwarding."""
    client = exchange.headers
    drop = dropped(client, _REQUEST_DROP)
    out: CIMultiDict[str] = CIMultiDict(
        [(k, v) for k, v in client.items() if k.lower() not in drop]
    )
    client_host = client.get("Host")
    if preserve_host and client_host:
        out["Host"] = client_host
    else:
        out["Host"] = upstream.raw_authority
    peer = exchange.remote or "unknown"
    prior = ", ".join(client.getall("X-Forwarded-For", ()))
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = exchange.scheme
    if client_host:
        out["X-Forwarded-Host"] = client_host
    out["Via"] = append_via(client.getall("Via", ()), exchange.version, via)
    return out


def response_headers(upstream: UpstreamResponse, version: Any, via: str) -> CIMultiDict[str]:
    """The headers sent to the client: the upstream's, less hop-by-hop, plus Via."""
    headers = upstream.headers
    drop = dropped(headers, HOP_BY_HOP)
    out: CIMultiDict[str] = CIMultiDict(
        [(k, v) for k, v in headers.items() if k.lower() not in drop]
    )
    out["Via"] = append_via(headers.getall("Via", ()), version, via)
    if upstream.status == 204:
        out.popall("Content-Length", None)  # RFC 9110 section 8.6: never on a 204
    return out


def relayable_reason(upstream: UpstreamResponse) -> str | None:
    """The upstream's reason phrase if it is one a client can be sent
    (visible ASCII and spaces), else None: the standard phrase is used."""
    reason = upstream.reason
    if reason is None or (reason.isascii() and reason.isprintable()):
        return reason
    return None


def append_via(prior: Any, version: Any, via: str) -> str:
    hop = f"{version.major}.{version.minor} {via}"
    return f"{', '.join(prior)}, {hop}" if prior else hop


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def prefer_wait(values: Any) -> float | None:
    """The ``wait`` preference of ``Prefer`` headers (RFC 7240), if any."""
    for value in values:
        for pref in value.split(","):
            name, _, arg = pref.strip().partition("=")
            if name.strip().lower() == "wait":
                try:
                    seconds = float(arg.strip().strip('"').split(";")[0])
                except ValueError:
                    return None
                return seconds if seconds > 0 else None
    return None
