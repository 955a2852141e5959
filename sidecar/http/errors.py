"""The sidecar's own answers to failures, in one place.

A failure the client must hear of (the upstream unreachable or too slow, a
request body too large or stalled, a bound reached) is raised as an
:class:`UpstreamError` with its status and message, wherever it happens;
the proxy's ``serve`` turns it into one JSON answer (:func:`error_body`:
``{"error": ..., "source": "sidecar", ...}``), the same shape the front
door uses for what it refuses itself. How the HTTP clients' exceptions map
to statuses is :func:`sidecar.http.upstream.Upstream.send`'s.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "BodyStalled",
    "BodyTooLarge",
    "UpstreamError",
    "error_body",
    "stalled",
    "too_large",
]


class UpstreamError(Exception):
    """A failure answered by the sidecar itself, with this status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(Exception):
    """The request body grew past ``max_request_body``."""


class BodyStalled(Exception):
    """The request body stopped arriving for ``body_timeout``."""


def too_large(limit: int) -> UpstreamError:
    return UpstreamError(413, f"request body larger than the limit of {limit} bytes")


def stalled(wait: float) -> UpstreamError:
    return UpstreamError(408, f"the request body stalled: no bytes for {wait:g} s")


def error_body(message: str, **extra: Any) -> bytes:
    """The JSON body of every answer the sidecar gives of its own."""
    return orjson.dumps({"error": message, "source": "sidecar", **extra})
