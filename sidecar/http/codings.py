"""Content codings of bodies the sidecar merges into: decoded with a bound, re-encoded.

Only the codings decoded here can be merged (``supported_encoding``); any
other answer passes through unmerged, and says so in a metric and the log.
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

__all__ = ["CodingError", "decode_body", "encode_body", "supported_encoding"]


class CodingError(MergeError):
    """A body that cannot be decoded within the bound: it cannot be merged,
    and is passed through unchanged."""


def supported_encoding(content_encoding: str) -> bool:
    coding = content_encoding.strip().lower()
    if coding in ("", "identity", "gzip", "x-gzip", "deflate", "zstd"):
        return True
    return coding == "br" and brotli is not None


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
