"""The small JSON bodies the proxy reads: a trigger's request, its error answer, a created id.

A body is read whole only when it is small (``SMALL_BODY``): larger ones
stream through untouched, and what they might have said is not learnt.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..core.profile import field_value
from ..http.client import UpstreamResponse
from ..http.codings import decode_body
from ..http.upstream import read_at_most

__all__ = ["SMALL_BODY", "answer_field", "json_field", "json_object", "read_small"]

#: Bodies up to this size on a trigger are read whole (then forwarded as they
#: came) to learn the client's session id; larger ones just stream through.
SMALL_BODY = 64 * 1024


async def read_small(upstream: UpstreamResponse) -> bytes | None:
    """The whole answer if it is small and already bounded, else None."""
    length = upstream.content_length
    if length is None or length > SMALL_BODY:
        return None
    return await read_at_most(upstream, length)


def answer_field(upstream: UpstreamResponse, answer: bytes, name: str | None) -> str | None:
    """A string field of a small JSON answer, decoded first if compressed."""
    try:
        encoding = upstream.headers.get("Content-Encoding", "")
        decoded = decode_body(answer, encoding, SMALL_BODY * 16)
    except (OSError, ValueError):
        return None
    return json_field(json_object(decoded), name)


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON object body, or {} for anything else."""
    if not body:
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def json_field(doc: dict[str, Any], name: str | None) -> str | None:
    if not name:
        return None
    value = field_value(doc, name)
    return value if isinstance(value, str) and value else None
