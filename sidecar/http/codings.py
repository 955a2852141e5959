"""Content codings of bodies the sidecar merges into: decoded with a bound, re-encoded.

Only the codings decoded here can be merged (``supported_encoding``); any
other answer passes through unmerged, and says so in a metric and the log.
So that a new coding never turns the merge off silently, a request whose
answer is merged asks the upstream only for these (``decodable_accept``):
the client's own preferences among them, its refusals kept.
"""

from __future__ import annotations

import gzip
import sys
import zlib

from ..core.merge import MergeError

try:  # a dependency; should an install lack it, br bodies pass through unmerged
    import brotli
except ImportError:  # pragma: no cover
    brotli = None

# zstd: the standard library's (PEP 784) from Python 3.14, its backport before.
if sys.version_info >= (3, 14):  # pragma: no cover
    from compression import zstd
else:
    from backports import zstd

# RFC 9659: a zstd coding's window is at most 8 MB, and a decoder may refuse
# more; it bounds the decoder's own memory, whatever the frame header asks.
ZSTD_WINDOW_LOG_MAX = 23

__all__ = [
    "CodingError",
    "decodable_accept",
    "decode_body",
    "encode_body",
    "supported_encoding",
    "zstd",  # the module, whichever Python provides it
]


class CodingError(MergeError):
    """A body that cannot be decoded within the bound: it cannot be merged,
    and is passed through unchanged."""


def supported_encoding(content_encoding: str) -> bool:
    coding = content_encoding.strip().lower()
    if coding in ("", "identity", "gzip", "x-gzip", "deflate", "zstd"):
        return True
    return coding == "br" and brotli is not None


def _decodable() -> tuple[str, ...]:
    """The codings decoded here, in the order ``*`` is expanded to them."""
    return ("zstd", "br", "gzip", "deflate") if brotli is not None else ("zstd", "gzip", "deflate")


def decodable_accept(accept: str | None) -> str | None:
    """The client's ``Accept-Encoding`` with only the codings decoded here.

    Each element keeps its place and its q-value as the client wrote them;
    a coding not decoded here is left out (the upstream could choose it, and
    the answer could not be merged); ``*`` stands for every decodable coding
    the client did not name, with its q-value (``*;q=0`` refuses them, and
    identity too, as RFC 9110 12.5.3 says), and refusals (``q=0``) are kept.
    A header that names nothing decodable asks for ``identity``, acceptable
    unless refused. A client that accepts only codings not decoded here is
    asked for as it asked (its answer passes unmerged, never a 406 of the
    sidecar's making); no header (None) stays None.
    """
    if accept is None:
        return None
    kept: list[str] = []
    named: set[str] = set()
    star: str | None = None  # the parameters of "*", as written
    acceptable = False  # a kept coding the client accepts
    identity_q: float | None = None
    changed = False
    for element in accept.split(","):
        element = element.strip()
        if not element:
            continue
        coding, _, params = element.partition(";")
        coding = coding.strip().lower()
        if coding == "x-gzip":
            coding = "gzip"
        if coding == "*":
            star, changed = params.strip(), True
            continue
        named.add(coding)
        if coding == "identity":
            identity_q = _q(params)
        if coding == "identity" or supported_encoding(coding):
            kept.append(element)
            acceptable = acceptable or _q(params) > 0
        else:
            changed = True
    if star is not None:
        for coding in (*_decodable(), "identity"):
            if coding not in named:
                kept.append(f"{coding};{star}" if star else coding)
                acceptable = acceptable or _q(star) > 0
    if not changed:
        return accept
    if identity_q is None and star is not None:
        identity_q = _q(star)
    if not acceptable and identity_q == 0:  # identity refused, by name or by "*;q=0"
        return accept
    return ", ".join(kept) if kept else "identity"


def _q(params: str) -> float:
    """An element's q-value (RFC 9110 12.4.2); absent or unreadable: 1."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 1.0
    return 1.0


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """Undo one content coding; more than ``limit`` bytes out is a CodingError.

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
    if coding == "zstd":
        return _unzstd(body, limit)
    raise CodingError(f"unsupported content coding {content_encoding!r}")


def _too_large() -> CodingError:
    return CodingError("decoded body exceeds the merge limit")


def _inflate(body: bytes, wbits: int, limit: int, members: bool) -> bytes:
    out = bytearray()
    data = body
    while True:
        d = zlib.decompressobj(wbits)
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit or d.unconsumed_tail:
            raise _too_large()
        if not d.eof:
            raise CodingError("truncated compressed body")
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
            raise CodingError("truncated compressed body")


def _unzstd(body: bytes, limit: int) -> bytes:
    """Every frame of the body (RFC 8878 allows several, and skippable ones),
    bounded as the output grows, the window bounded by RFC 9659."""
    out = bytearray()
    data = body
    while True:
        try:
            d = zstd.ZstdDecompressor(
                options={zstd.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX}
            )
            out += d.decompress(data, limit + 1 - len(out))
        except zstd.ZstdError as exc:
            raise CodingError(f"invalid zstd body: {exc}") from None
        if len(out) > limit:
            raise _too_large()
        if not d.eof:
            if d.needs_input:
                raise CodingError("truncated compressed body")
            raise _too_large()  # output held back: there is more than the limit
        data = d.unused_data
        if not data:
            return bytes(out)


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
    if coding == "zstd":
        return zstd.compress(body, level=3)
    raise CodingError(f"unsupported content coding {content_encoding!r}")
